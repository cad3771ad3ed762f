//! `idm-shm`: the local shared-memory transport for `idm-core`, for one host (development,
//! tests, GPU benchmarks, and local zones).
//!
//! * [`MemfdRegion`] — a sealed memfd mapped shared; the receiver checks seals and size
//!   before mapping, so the peer cannot shrink it under us.
//! * [`ChannelLayout`] — where the control page, both rings and the data window live, and
//!   the constructors that give each side its [`ShmChannel`] and [`ShmWindow`].
//! * [`FutexDoorbell`] — `idm_core`'s [`Notifier`](idm_core::Notifier) and
//!   [`Waiter`](idm_core::Waiter) on futex words in the region, which notice a dead peer.
//! * [`ShmListener`] / [`connect`] — the unix-socket handshake that passes the memfd
//!   (`SCM_RIGHTS`) and identifies the client (`SO_PEERCRED`); the socket then stays open
//!   as the [`PeerWatch`].
//!
//! ```no_run
//! use idm_core::{Client, Server, WaitPolicy};
//! use idm_shm::{connect, ChannelLayout, ServerLimits, ShmListener};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Server (host-proxy):
//! let listener = ShmListener::bind("/run/vgpu/local.sock", ServerLimits::default())?;
//! let ep = listener.accept(WaitPolicy::default())?;
//! println!("zone: pid {} uid {}", ep.peer.pid, ep.peer.uid);
//! let mut buf = vec![0u8; 64 << 10];
//! let server = Server::accept(ep.channel, 64 << 10, &mut buf)?;
//!
//! // Client (libvgpu), in another process:
//! let layout = ChannelLayout::new(1 << 20, 64 << 20)?;
//! let ep = connect("/run/vgpu/local.sock", layout, WaitPolicy::default())?;
//! let client = Client::connect(ep.channel, 64 << 10, &mut buf)?;
//! # Ok(()) }
//! ```
//!
//! **Peer death.** A side that blocks notices a dead peer within [`LIVENESS_INTERVAL`]
//! (the peer's *closed* word at once, the socket's hang-up at the next check; see
//! [`FutexDoorbell`]). Spinning does not check: with `WaitPolicy::spin_iters` very large
//! (pure polling), a dead peer is noticed only once the spin budget runs out. Keep the spin
//! budget finite (the default is tens of microseconds) unless the peer is supervised
//! another way, e.g. by registering [`PeerWatch::socket`] with an event loop.
//!
//! Architecture invariant: this crate knows nothing of CUDA or of the messages carried; it
//! only provides memory, a doorbell and a handshake for `idm-core`'s channel. All access to
//! the shared region goes through `idm_core::RawRegion` (atomics, no references).
#![deny(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod futex;
mod handshake;
pub mod layout;
mod memfd;
mod scm;

pub use error::{RefuseReason, ShmError};
pub use futex::{FutexDoorbell, Side, LIVENESS_INTERVAL};
pub use handshake::{
    accept_stream, connect, connect_stream, PeerWatch, ServerLimits, ShmEndpoint, ShmListener,
    CLIENT_HANDSHAKE_TIMEOUT, HANDSHAKE_VERSION, MAGIC,
};
pub use layout::{
    ChannelLayout, GeometryError, LayoutError, ShmChannel, ShmClient, ShmLayout, ShmMemory, ShmServer, ShmWindow,
};
pub use memfd::MemfdRegion;
pub use scm::PeerCred;
