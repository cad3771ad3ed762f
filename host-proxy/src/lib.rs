//! host-proxy: the driver-domain daemon of xen-vgpu.
//!
//! * [`daemon`] (tokio control plane) accepts guests on the local transport, spawns one
//!   worker process per zone and supervises it.
//! * [`worker`] is the per-zone data path: a synchronous loop over the zone's idm channel,
//!   no async scheduling per call.
//! * [`zone`] checks each request against the zone's allocations, handles and quotas and
//!   runs it on a [`backend`]: `cuda` (the real GPU) or `sim` (a test double).
//! * [`device_output`] captures what kernels print in the worker and hands it to the guest.
//! * [`broker`] is CUDA IPC between workers: the daemon's registry of exported
//!   allocations, its policy, and the private channel each worker talks to it over.
#![deny(unsafe_code)]

pub mod backend;
pub mod broker;
pub mod config;
pub mod daemon;
#[allow(unsafe_code)] // descriptors, pipes and stdio of the worker process
pub mod device_output;
pub mod events;
#[cfg(any(test, feature = "test-utils"))]
pub mod fuzz;
pub mod handles;
pub mod image;
pub mod ledger;
pub mod metrics;
pub mod mps;
pub mod nvml;
pub mod status;
pub mod worker;
pub mod xen;
pub mod zone;
