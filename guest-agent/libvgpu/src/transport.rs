//! The two transports libvgpu can reach host-proxy over, behind one set of types.
//!
//! * `shm` — the local transport (memfd + futex over a unix-socket handshake): development,
//!   tests, GPU benchmarks on one host. Chosen by `VGPU_TRANSPORT=shm`, or by default
//!   outside Xen.
//! * `xen` — in a Xen guest: grant pages, an event channel and the xenstore handshake
//!   (`idm_xen::channel`) with host-proxy in dom0. Chosen by `VGPU_TRANSPORT=xen`, or by
//!   default when `/dev/xen/gntalloc` exists and `VGPU_SOCKET` is not set.
//!
//! The enums cost one predictable branch per shared-memory access; everything above them
//! (the channel, the window, the call paths) is the same code for both.

use idm_core::notify::WaitToken;
use idm_core::{Channel, DataWindow, Notifier, NotifyError, SharedMemory, WaitOutcome, Waiter};
use idm_shm::{ChannelLayout, FutexDoorbell, MemfdRegion, ShmEndpoint, ShmMemory};
use idm_xen::channel::{XenBell, XenEndpoint, XenMemory};
use idm_xen::GrantRegion;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Shared memory of either transport.
pub enum Mem {
    /// memfd.
    Shm(ShmMemory),
    /// Xen grant pages.
    Xen(XenMemory),
}

macro_rules! each {
    ($self:expr, $m:ident => $e:expr) => {
        match $self {
            Mem::Shm($m) => $e,
            Mem::Xen($m) => $e,
        }
    };
}

impl SharedMemory for Mem {
    #[inline]
    fn size(&self) -> usize {
        each!(self, m => m.size())
    }
    #[inline]
    fn load_u32(&self, offset: usize, order: Ordering) -> u32 {
        each!(self, m => m.load_u32(offset, order))
    }
    #[inline]
    fn store_u32(&self, offset: usize, value: u32, order: Ordering) {
        each!(self, m => m.store_u32(offset, value, order))
    }
    #[inline]
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        each!(self, m => m.read_bytes(offset, dst))
    }
    #[inline]
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        each!(self, m => m.write_bytes(offset, src))
    }
}

/// The doorbell of either transport.
#[derive(Clone)]
pub enum Bell {
    /// Futex words in the memfd.
    Shm(FutexDoorbell),
    /// An event channel.
    Xen(XenBell),
}

impl Notifier for Bell {
    #[inline]
    fn notify(&self) -> Result<(), NotifyError> {
        match self {
            Bell::Shm(b) => b.notify(),
            Bell::Xen(b) => b.notify(),
        }
    }
}

impl Waiter for Bell {
    #[inline]
    fn arm(&self) -> WaitToken {
        match self {
            Bell::Shm(b) => b.arm(),
            Bell::Xen(b) => b.arm(),
        }
    }
    fn wait(&self, token: WaitToken, timeout: Option<Duration>) -> Result<WaitOutcome, NotifyError> {
        match self {
            Bell::Shm(b) => b.wait(token, timeout),
            Bell::Xen(b) => b.wait(token, timeout),
        }
    }
}

/// What keeps the shared mapping alive.
pub enum Mapping {
    /// The memfd region.
    Shm(MemfdRegion),
    /// The granted pages.
    Xen(GrantRegion),
}

impl Mapping {
    /// The first byte of the whole region.
    pub fn base(&self) -> *mut u8 {
        match self {
            Mapping::Shm(r) => r.raw().as_ptr(),
            Mapping::Xen(r) => r.raw().as_ptr(),
        }
    }
}

/// A connected transport, before the idm hello.
pub struct Connected {
    /// The channel.
    pub channel: Channel<Mem, Bell, Bell>,
    /// The data window.
    pub window: DataWindow<Mem>,
    /// The geometry.
    pub layout: ChannelLayout,
    /// The mapping.
    pub mapping: Mapping,
}

impl From<ShmEndpoint> for Connected {
    fn from(ep: ShmEndpoint) -> Self {
        let (tx, rx, n, w, policy) = ep.channel.into_parts();
        let channel =
            Channel::new(tx.map_memory(Mem::Shm), rx.map_memory(Mem::Shm), Bell::Shm(n), Bell::Shm(w), policy);
        Connected {
            channel,
            window: ep.window.map_memory(Mem::Shm),
            layout: ep.layout,
            mapping: Mapping::Shm(ep.region),
        }
    }
}

/// Converts a Xen endpoint. Its directory pages are released: the backend copied the
/// directory before it connected.
pub fn from_xen(ep: XenEndpoint) -> Connected {
    let XenEndpoint { channel, window, layout, region, .. } = ep;
    let (tx, rx, n, w, policy) = channel.into_parts();
    let channel = Channel::new(tx.map_memory(Mem::Xen), rx.map_memory(Mem::Xen), Bell::Xen(n), Bell::Xen(w), policy);
    Connected { channel, window: window.map_memory(Mem::Xen), layout, mapping: Mapping::Xen(region) }
}
