//! `libvgpu`: a drop-in `libcuda.so.1` for xen-vgpu guests.
//!
//! Applications (linked with `-lcuda`, or loading `libcuda.so.1` with `dlopen` as cudarc
//! and the CUDA runtime do) call the CUDA driver API as usual; every call is either served
//! here (device facts, error strings, context stacks, entry-point lookup) or forwarded to
//! host-proxy over an idm-core channel, which runs it in this zone's own CUDA context on
//! the real GPU.
//!
//! * [`generated`] — produced by `cargo xtask codegen` from `api.toml`: one exported
//!   `extern "C"` function per entry point, the `cuGetProcAddress` table, error names.
//! * `imp` — hand-written implementations of the entry points served in the guest.
//! * [`rt`] — the runtime: session with host-proxy, per-thread contexts, errors, logging.
//! * `window` — the shared data window: staging area and pinned host memory.
//!
//! Environment: `VGPU_SOCKET` (host-proxy's socket, default
//! `/tmp/xen-vgpu/host-proxy.sock`), `VGPU_WINDOW_MB` (shared window size, default 256),
//! `VGPU_LOG` (`off`, `error`, `warn` (default), `info`, `debug`).
#![allow(non_snake_case)]

#[rustfmt::skip]
#[allow(missing_docs, clippy::all, clippy::undocumented_unsafe_blocks)]
pub mod generated;
mod imp;
pub mod rt;
mod transport;
mod window;
