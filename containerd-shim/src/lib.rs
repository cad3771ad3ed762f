//! `containerd-shim-xenvgpu-v2`: xen-vgpu's containerd shim v2 (runtime type
//! `io.containerd.xenvgpu.v2`, handler `xenvgpu`).
//!
//! One shim instance serves one pod sandbox (containerd groups a pod's containers by the CRI
//! sandbox id) and, with the Xen backend, one zone. The parts:
//!
//! - [`tasks`]: the task state machine (containers, init and exec'd processes, the
//!   transitions containerd allows, the events it expects, in its order), over a
//! - [`backend::ZoneBackend`]: what runs the processes. Two exist: the Xen zone backend
//!   (not built yet: it needs the guest agent's in-zone container runtime; every create is
//!   refused with that reason) and [`host_double::HostProcessBackend`], a test double that
//!   runs containers as chrooted host processes so that the shim is tested through a real
//!   containerd on machines without Xen;
//! - [`spec`]: the bundle's OCI `config.json` and exec specs, checked;
//! - [`image`]: a container's image layers as one read-only erofs file, cached by the layers'
//!   identity, for a zone to get as a PV block device (the Xen backend will use it);
//! - [`naming`]: a pod's zone name (`<namespace>.<name>`), which host-proxy's configuration
//!   uses for quotas and sharing groups;
//! - [`service`]: containerd's shim v2 entry points and the ttrpc task service.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod backend;
pub mod host_double;
pub mod image;
pub mod naming;
pub mod service;
pub mod spec;
pub mod tasks;
