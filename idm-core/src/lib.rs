//! `idm-core`: the inter-domain messaging core of xen-vgpu.
//!
//! Everything that crosses between a guest (domU) and the driver domain goes through this
//! crate: a fixed little-endian frame header with postcard bodies ([`wire`]), a
//! single-producer/single-consumer byte ring per direction over memory the peer can write
//! at any time ([`ring`]), a transport-neutral doorbell ([`notify`]), bulk-data descriptors
//! into a shared data window ([`bulk`]), and the request/response [`channel`] built from
//! them. Byte-stream transports (a serial line, a socket during a handshake) get framing
//! adapters in [`stream`].
//!
//! The crate is `#![no_std]`, allocates nothing, and knows nothing of CUDA, Xen, std or
//! tokio: transports plug in through [`region::SharedMemory`], [`notify::Notifier`] and
//! [`notify::Waiter`].
//!
//! # The peer is hostile
//! Every index read from shared memory is read once and checked with wrapping arithmetic;
//! every frame is copied out of shared memory once, then parsed from the copy; no Rust
//! reference ever points into peer-writable memory. A violation moves the connection into a
//! sticky failed state with a clear error. Nothing here panics on peer input, spins without
//! bound, or allocates.
#![no_std]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod bulk;
pub mod channel;
pub mod geometry;
pub mod notify;
pub mod region;
pub mod ring;
pub mod stream;
pub mod wire;

pub use bulk::{BulkError, BulkRef, DataWindow};
pub use channel::{Channel, ChannelError, Client, Incoming, Reply, Server};
pub use geometry::{ChannelLayout, GeometryError};
pub use notify::{Notifier, NotifyError, WaitOutcome, WaitPolicy, Waiter};
pub use region::{RawRegion, SharedMemory, SubRegion};
pub use ring::{RingConsumer, RingError, RingProducer};
pub use wire::{FrameHeader, Message, MessageId, WireError};
