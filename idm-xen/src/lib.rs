//! `idm-xen`: the Xen transport for `idm-core`, through Linux's Xen userspace devices.
//!
//! Our own small binding: raw `ioctl`s through `libc`, no Xen C libraries. The layouts
//! follow the kernel's `include/uapi/xen/*.h` and Xen's `io/xs_wire.h`; each struct's size
//! is checked at compile time and each ioctl number by a test.
//!
//! | module | device | who uses it, for what |
//! |---|---|---|
//! | [`gntalloc`] | `/dev/xen/gntalloc` | the guest: allocate pages and grant them to dom0 (the rings and the data window) |
//! | [`gntdev`] | `/dev/xen/gntdev` | dom0: map the pages a guest granted |
//! | [`evtchn`] | `/dev/xen/evtchn` | both: one event channel per connection, the doorbell |
//! | [`xenstore`] | `/run/xenstored/socket` (dom0), `/dev/xen/xenbus` (guest) | both: publish and read the handshake keys (`ring-ref`, `event-channel`, ...) |
//! | [`xenbus`] | — | the split-driver `state` handshake on top of xenstore |
//!
//! [`EvtchnDoorbell`] and [`GrantRegion`] adapt an event channel and grant pages to
//! `idm_core`'s [`Notifier`](idm_core::Notifier)/[`Waiter`](idm_core::Waiter) and
//! [`SharedMemory`](idm_core::SharedMemory), so an `idm_core::Channel` runs over them
//! unchanged.
//!
//! **Invariant:** no Rust reference or slice ever points into granted memory. The peer
//! domain can write those pages at any moment, so they are reached only through
//! `idm_core::RawRegion` (atomic loads and stores); [`GrantedPages::as_ptr`] and
//! [`MappedGrants::as_ptr`] hand out a raw address for the same reason.
//!
//! Feature `grants` (on by default) builds the grant, event-channel and channel modules;
//! without it the crate is the xenstore client and the xenbus state machine alone (what the
//! guest agent links).
//!
//! Only the device modules (`gntalloc`, `gntdev`, `evtchn`, `sys`) contain `unsafe`; the
//! xenstore client, the state machine and the adapters are safe code and are tested
//! without Xen (the xenstore client against a fake daemon on a socket pair).
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "grants")]
pub mod channel;
#[cfg(feature = "grants")]
mod doorbell;
mod error;
#[cfg(feature = "grants")]
#[allow(unsafe_code)]
pub mod evtchn;
#[cfg(feature = "grants")]
#[allow(unsafe_code)]
pub mod gntalloc;
#[cfg(feature = "grants")]
#[allow(unsafe_code)]
pub mod gntdev;
#[cfg(feature = "grants")]
mod grant_region;
#[allow(unsafe_code)]
mod sys;
pub mod xenbus;
pub mod xenstore;

#[cfg(feature = "grants")]
pub use doorbell::{EventPort, EvtchnDoorbell};
pub use error::XenError;
#[cfg(feature = "grants")]
pub use evtchn::EventChannel;
#[cfg(feature = "grants")]
pub use gntalloc::{GntAlloc, GrantedPages};
#[cfg(feature = "grants")]
pub use gntdev::{GntDev, MappedGrants};
#[cfg(feature = "grants")]
pub use grant_region::GrantRegion;
pub use sys::XEN_PAGE_SIZE;
pub use xenbus::XenbusState;
pub use xenstore::{Access, Perm, TxId, WatchEvent, XenStore, XsErrno, XsError};
