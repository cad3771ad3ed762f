//! The local transport's side of the channel geometry: a memfd region laid out as
//! [`idm_core::geometry`] describes (control page with the futex bells, two rings, data
//! window), created and initialised by the client, attached by the server.
//!
//! The client creates and initialises the region; the server only attaches. Nothing read
//! from the region is trusted: the layout comes from the validated handshake, and the
//! rings validate every index they read.

use crate::futex::{FutexDoorbell, Side};
use crate::handshake::PeerWatch;
use crate::memfd::MemfdRegion;
pub use idm_core::geometry::{
    field, ChannelLayout, GeometryError, MAX_RING_SIZE, MAX_WINDOW_SIZE, MIN_RING_SIZE, PAGE,
};
use idm_core::ring::{RingConsumer, RingProducer};
use idm_core::{Channel, Client, DataWindow, Server, SharedMemory, SubRegion, WaitPolicy};
use std::sync::atomic::Ordering;

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

/// Why a layout cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The sizes are not a valid geometry.
    #[error(transparent)]
    Geometry(#[from] GeometryError),
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

/// The local transport's operations on a [`ChannelLayout`]: the memfd region it describes.
pub trait ShmLayout {
    /// Creates a fresh region of [`ChannelLayout::total_size`] bytes, initialised. This is
    /// the client's job.
    fn create_region(&self, name: &str) -> Result<MemfdRegion, crate::ShmError>;
    /// Zeroes the control words and both ring headers of `region` (the creator does this
    /// once, before sending the region to the peer).
    fn initialize(&self, region: &MemfdRegion) -> Result<(), LayoutError>;
    /// The client's channel (sends on client-to-server, receives on server-to-client) and
    /// the data window. `watch` is consulted when a wait times out, to notice a dead peer.
    fn client_side(
        &self,
        region: &MemfdRegion,
        watch: Option<PeerWatch>,
        policy: WaitPolicy,
    ) -> Result<(ShmChannel, ShmWindow), LayoutError>;
    /// The server's channel (sends on server-to-client, receives on client-to-server) and
    /// the data window.
    fn server_side(
        &self,
        region: &MemfdRegion,
        watch: Option<PeerWatch>,
        policy: WaitPolicy,
    ) -> Result<(ShmChannel, ShmWindow), LayoutError>;
}

fn check_region(l: &ChannelLayout, region: &MemfdRegion) -> Result<(), LayoutError> {
    if region.size() != l.total_size() {
        return Err(LayoutError::RegionSize { expected: l.total_size(), actual: region.size() });
    }
    Ok(())
}

fn sub(region: &MemfdRegion, base: usize, len: usize) -> ShmMemory {
    // In bounds and page-aligned by construction, once `check_region` passed.
    SubRegion::new(region.clone(), base, len).expect("layout parts lie inside the region")
}

fn rings(l: &ChannelLayout, region: &MemfdRegion) -> (ShmMemory, ShmMemory) {
    let len = l.ring_footprint();
    (sub(region, l.client_to_server_offset(), len), sub(region, l.server_to_client_offset(), len))
}

fn side(
    l: &ChannelLayout,
    region: &MemfdRegion,
    side: Side,
    watch: Option<PeerWatch>,
    policy: WaitPolicy,
) -> Result<(ShmChannel, ShmWindow), LayoutError> {
    check_region(l, region)?;
    let (c2s, s2c) = rings(l, region);
    let (tx, rx) = match side {
        Side::Client => (c2s, s2c),
        Side::Server => (s2c, c2s),
    };
    let size = l.ring_size();
    // Geometry was validated when the layout was made; the frame limit is set by the hello.
    let tx = RingProducer::attach(tx, size).expect("ring geometry was checked");
    let rx = RingConsumer::attach(rx, size, 0).expect("ring geometry was checked");
    let bell = FutexDoorbell::new(region.clone(), side, watch);
    let channel = Channel::new(tx, rx, bell.clone(), bell, policy);
    let window = DataWindow::new(sub(region, l.window_offset(), l.window_size()));
    Ok((channel, window))
}

impl ShmLayout for ChannelLayout {
    fn create_region(&self, name: &str) -> Result<MemfdRegion, crate::ShmError> {
        let region = MemfdRegion::create(name, self.total_size())?;
        self.initialize(&region)?;
        Ok(region)
    }

    fn initialize(&self, region: &MemfdRegion) -> Result<(), LayoutError> {
        check_region(self, region)?;
        for off in [field::CLIENT_BELL, field::SERVER_BELL, field::CLIENT_CLOSED, field::SERVER_CLOSED] {
            region.store_u32(off, 0, Ordering::Relaxed);
        }
        let (c2s, s2c) = rings(self, region);
        for mem in [c2s, s2c] {
            RingProducer::init(mem, self.ring_size()).expect("ring geometry was checked");
        }
        Ok(())
    }

    fn client_side(
        &self,
        region: &MemfdRegion,
        watch: Option<PeerWatch>,
        policy: WaitPolicy,
    ) -> Result<(ShmChannel, ShmWindow), LayoutError> {
        side(self, region, Side::Client, watch, policy)
    }

    fn server_side(
        &self,
        region: &MemfdRegion,
        watch: Option<PeerWatch>,
        policy: WaitPolicy,
    ) -> Result<(ShmChannel, ShmWindow), LayoutError> {
        side(self, region, Side::Server, watch, policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_region_size_is_refused() {
        let l = ChannelLayout::new(4096, 0).unwrap();
        let region = MemfdRegion::create("t", 4096 * 4).unwrap();
        assert!(matches!(l.client_side(&region, None, WaitPolicy::default()), Err(LayoutError::RegionSize { .. })));
        assert!(matches!(l.initialize(&region), Err(LayoutError::RegionSize { .. })));
    }
}
