//! Where the parts of one channel live in the shared region.
//!
//! ```text
//!  0                       control page
//!      +0    client bell     futex word the client sleeps on; the server bumps it
//!      +64   server bell     futex word the server sleeps on; the client bumps it
//!      +128  client closed   non-zero once the client has hung up
//!      +192  server closed   non-zero once the server has hung up
//!  4096                    ring client -> server  (idm_core::ring layout, 256 + ring_size)
//!  4096 + span             ring server -> client
//!  4096 + 2 * span         data window (window_size bytes)
//! ```
//!
//! `span` is the ring's footprint rounded up to a page, so every part starts on a page
//! (the data window can later be registered with the GPU driver as page-aligned host
//! memory). Each word of the control page has its own cache line, so a side sleeping on
//! its bell does not false-share with the other side's bell.
//!
//! The client creates and initialises the region; the server only attaches. Nothing read
//! from the region is trusted: the layout comes from the validated handshake, and the
//! rings validate every index they read.

use crate::futex::{FutexDoorbell, Side};
use crate::handshake::PeerWatch;
use crate::memfd::MemfdRegion;
use idm_core::ring::{self, RingConsumer, RingProducer};
use idm_core::{Channel, Client, DataWindow, Server, SharedMemory, SubRegion, WaitPolicy};
use std::sync::atomic::Ordering;

/// Page size every part of the layout is aligned to.
pub const PAGE: usize = 4096;
/// Smallest ring data size: one page.
pub const MIN_RING_SIZE: usize = PAGE;
/// Largest ring data size (idm-core's limit).
pub const MAX_RING_SIZE: usize = ring::MAX_SIZE;
/// Largest data window the layout can describe (1 TiB); servers apply smaller limits.
pub const MAX_WINDOW_SIZE: usize = 1 << 40;
const _: () = assert!(usize::BITS == 64, "idm-shm assumes a 64-bit address space");

/// Byte offsets of the control-page words.
pub mod field {
    /// The client's bell (the client waits on it).
    pub const CLIENT_BELL: usize = 0;
    /// The server's bell (the server waits on it).
    pub const SERVER_BELL: usize = 64;
    /// Set by the client when it hangs up.
    pub const CLIENT_CLOSED: usize = 128;
    /// Set by the server when it hangs up.
    pub const SERVER_CLOSED: usize = 192;
}

/// The memory one side's channel lives in: a window of the shared region.
pub type ShmMemory = SubRegion<MemfdRegion>;
/// One side's channel over the shared region.
pub type ShmChannel = Channel<ShmMemory, FutexDoorbell, FutexDoorbell>;
/// The shared data window.
pub type ShmWindow = DataWindow<ShmMemory>;
/// A connected client (after [`idm_core::Client::connect`]).
pub type ShmClient = Client<ShmMemory, FutexDoorbell, FutexDoorbell>;
/// A connected server (after [`idm_core::Server::accept`]).
pub type ShmServer = Server<ShmMemory, FutexDoorbell, FutexDoorbell>;

/// Why a geometry is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The ring size is not a power of two in range.
    #[error("ring size {0} is invalid: it must be a power of two from {MIN_RING_SIZE} to {MAX_RING_SIZE} bytes")]
    RingSize(u64),
    /// The window size is neither zero nor a power of two in range.
    #[error("data window size {0} is invalid: it must be 0 or a power of two from {PAGE} to {MAX_WINDOW_SIZE} bytes")]
    WindowSize(u64),
    /// The region handed in is not the size the layout needs.
    #[error(
        "shared region has {actual} bytes but the layout needs {expected}; create it with ChannelLayout::total_size"
    )]
    RegionSize {
        /// Bytes the layout needs.
        expected: usize,
        /// Bytes the region has.
        actual: usize,
    },
}

/// The geometry of one channel: ring and data-window sizes, and the offsets they imply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelLayout {
    ring_size: usize,
    window_size: usize,
}

impl ChannelLayout {
    /// Checks and makes a layout: `ring_size` a power of two in
    /// `MIN_RING_SIZE..=MAX_RING_SIZE`, `window_size` zero or a power of two in
    /// `PAGE..=MAX_WINDOW_SIZE`.
    pub fn new(ring_size: usize, window_size: usize) -> Result<Self, LayoutError> {
        if !ring_size.is_power_of_two() || !(MIN_RING_SIZE..=MAX_RING_SIZE).contains(&ring_size) {
            return Err(LayoutError::RingSize(ring_size as u64));
        }
        if window_size != 0 && (!window_size.is_power_of_two() || !(PAGE..=MAX_WINDOW_SIZE).contains(&window_size)) {
            return Err(LayoutError::WindowSize(window_size as u64));
        }
        Ok(ChannelLayout { ring_size, window_size })
    }

    /// Data bytes of each ring.
    pub fn ring_size(&self) -> usize {
        self.ring_size
    }

    /// Bytes of the data window.
    pub fn window_size(&self) -> usize {
        self.window_size
    }

    /// Bytes one ring occupies, rounded up to a page.
    fn ring_span(&self) -> usize {
        ring::footprint(self.ring_size).next_multiple_of(PAGE)
    }

    /// Offset of the client-to-server ring.
    pub fn client_to_server_offset(&self) -> usize {
        PAGE
    }

    /// Offset of the server-to-client ring.
    pub fn server_to_client_offset(&self) -> usize {
        PAGE + self.ring_span()
    }

    /// Offset of the data window.
    pub fn window_offset(&self) -> usize {
        PAGE + 2 * self.ring_span()
    }

    /// Size of the whole shared region. Cannot overflow: both sizes are bounded.
    pub fn total_size(&self) -> usize {
        self.window_offset() + self.window_size
    }

    fn check_region(&self, region: &MemfdRegion) -> Result<(), LayoutError> {
        if region.size() != self.total_size() {
            return Err(LayoutError::RegionSize { expected: self.total_size(), actual: region.size() });
        }
        Ok(())
    }

    fn sub(&self, region: &MemfdRegion, base: usize, len: usize) -> ShmMemory {
        // In bounds and page-aligned by construction, once `check_region` passed.
        SubRegion::new(region.clone(), base, len).expect("layout parts lie inside the region")
    }

    fn rings(&self, region: &MemfdRegion) -> (ShmMemory, ShmMemory) {
        let len = ring::footprint(self.ring_size);
        (self.sub(region, self.client_to_server_offset(), len), self.sub(region, self.server_to_client_offset(), len))
    }

    /// Creates a fresh region of [`total_size`](Self::total_size) bytes, initialised.
    /// This is the client's job.
    pub fn create_region(&self, name: &str) -> Result<MemfdRegion, crate::ShmError> {
        let region = MemfdRegion::create(name, self.total_size())?;
        self.initialize(&region)?;
        Ok(region)
    }

    /// Zeroes the control words and both ring headers of `region` (the creator does this
    /// once, before sending the region to the peer).
    pub fn initialize(&self, region: &MemfdRegion) -> Result<(), LayoutError> {
        self.check_region(region)?;
        for off in [field::CLIENT_BELL, field::SERVER_BELL, field::CLIENT_CLOSED, field::SERVER_CLOSED] {
            region.store_u32(off, 0, Ordering::Relaxed);
        }
        let (c2s, s2c) = self.rings(region);
        for mem in [c2s, s2c] {
            RingProducer::init(mem, self.ring_size).expect("ring geometry was checked");
        }
        Ok(())
    }

    /// The client's channel (sends on client-to-server, receives on server-to-client) and
    /// the data window. `watch` is consulted when a wait times out, to notice a dead peer.
    pub fn client_side(
        &self,
        region: &MemfdRegion,
        watch: Option<PeerWatch>,
        policy: WaitPolicy,
    ) -> Result<(ShmChannel, ShmWindow), LayoutError> {
        self.side(region, Side::Client, watch, policy)
    }

    /// The server's channel (sends on server-to-client, receives on client-to-server) and
    /// the data window.
    pub fn server_side(
        &self,
        region: &MemfdRegion,
        watch: Option<PeerWatch>,
        policy: WaitPolicy,
    ) -> Result<(ShmChannel, ShmWindow), LayoutError> {
        self.side(region, Side::Server, watch, policy)
    }

    fn side(
        &self,
        region: &MemfdRegion,
        side: Side,
        watch: Option<PeerWatch>,
        policy: WaitPolicy,
    ) -> Result<(ShmChannel, ShmWindow), LayoutError> {
        self.check_region(region)?;
        let (c2s, s2c) = self.rings(region);
        let (tx, rx) = match side {
            Side::Client => (c2s, s2c),
            Side::Server => (s2c, c2s),
        };
        let size = self.ring_size;
        // Geometry was validated in `new`; the frame limit is set by the hello exchange.
        let tx = RingProducer::attach(tx, size).expect("ring geometry was checked");
        let rx = RingConsumer::attach(rx, size, 0).expect("ring geometry was checked");
        let bell = FutexDoorbell::new(region.clone(), side, watch);
        let channel = Channel::new(tx, rx, bell.clone(), bell, policy);
        let window = DataWindow::new(self.sub(region, self.window_offset(), self.window_size));
        Ok((channel, window))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_page_aligned_and_disjoint() {
        let l = ChannelLayout::new(4096, 1 << 20).unwrap();
        assert_eq!(l.client_to_server_offset(), 4096);
        assert_eq!(l.server_to_client_offset(), 4096 + 8192);
        assert_eq!(l.window_offset(), 4096 + 2 * 8192);
        assert_eq!(l.total_size(), 4096 + 2 * 8192 + (1 << 20));
        let l = ChannelLayout::new(1 << 22, 0).unwrap();
        assert_eq!(l.total_size(), 4096 + 2 * ((1 << 22) + 4096));
    }

    #[test]
    fn bad_sizes_are_refused() {
        for ring in [0, 64, 2048, 5000, 1 << 31] {
            assert_eq!(ChannelLayout::new(ring, 0), Err(LayoutError::RingSize(ring as u64)));
        }
        for window in [1, 2048, 12288, 1 << 41] {
            assert_eq!(ChannelLayout::new(4096, window), Err(LayoutError::WindowSize(window as u64)));
        }
    }

    #[test]
    fn wrong_region_size_is_refused() {
        let l = ChannelLayout::new(4096, 0).unwrap();
        let region = MemfdRegion::create("t", 4096 * 4).unwrap();
        assert!(matches!(l.client_side(&region, None, WaitPolicy::default()), Err(LayoutError::RegionSize { .. })));
    }
}
