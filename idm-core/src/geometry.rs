//! Where the parts of one channel live in its shared region — the geometry both transports
//! use (the local one over a memfd, the Xen one over granted pages).
//!
//! ```text
//!  0                       control page
//!      +0    client bell     (local transport) futex word the client sleeps on
//!      +64   server bell     (local transport) futex word the server sleeps on
//!      +128  client closed   non-zero once the client has hung up
//!      +192  server closed   non-zero once the server has hung up
//!  4096                    ring client -> server  (`ring` layout, 256 + ring_size)
//!  4096 + span             ring server -> client
//!  4096 + 2 * span         data window (window_size bytes)
//! ```
//!
//! `span` is the ring's footprint rounded up to a page, so every part starts on a page (the
//! data window can be registered with the GPU driver as page-aligned host memory, and Xen
//! grants whole pages). Each word of the control page has its own cache line, so a side
//! sleeping on its bell does not false-share with the other side's bell. The Xen transport
//! signals with event channels and leaves the bells unused; the page is part of the layout
//! all the same, so both transports agree on every offset.
//!
//! Only arithmetic lives here: a [`ChannelLayout`] is checked when made, and every offset
//! and size it gives is in bounds and cannot overflow.

use crate::ring;

/// Page size every part of the layout is aligned to.
pub const PAGE: usize = 4096;
/// Smallest ring data size: one page.
pub const MIN_RING_SIZE: usize = PAGE;
/// Largest ring data size (the ring's limit).
pub const MAX_RING_SIZE: usize = ring::MAX_SIZE;
/// Largest data window the layout can describe (1 TiB); servers apply smaller limits.
pub const MAX_WINDOW_SIZE: usize = 1 << 40;
const _: () = assert!(usize::BITS == 64, "the channel layout assumes a 64-bit address space");

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

/// Why a geometry is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GeometryError {
    /// The ring size is not a power of two in range.
    RingSize(u64),
    /// The window size is neither zero nor a power of two in range.
    WindowSize(u64),
}

impl core::fmt::Display for GeometryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            GeometryError::RingSize(n) => write!(
                f,
                "ring size {n} is invalid: it must be a power of two from {MIN_RING_SIZE} to {MAX_RING_SIZE} bytes"
            ),
            GeometryError::WindowSize(n) => write!(
                f,
                "data window size {n} is invalid: it must be 0 or a power of two from {PAGE} to {MAX_WINDOW_SIZE} bytes"
            ),
        }
    }
}

impl core::error::Error for GeometryError {}

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
    pub fn new(ring_size: usize, window_size: usize) -> Result<Self, GeometryError> {
        if !ring_size.is_power_of_two() || !(MIN_RING_SIZE..=MAX_RING_SIZE).contains(&ring_size) {
            return Err(GeometryError::RingSize(ring_size as u64));
        }
        if window_size != 0 && (!window_size.is_power_of_two() || !(PAGE..=MAX_WINDOW_SIZE).contains(&window_size)) {
            return Err(GeometryError::WindowSize(window_size as u64));
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

    /// Bytes of each ring's memory (header and data): what a ring is attached to.
    pub fn ring_footprint(&self) -> usize {
        ring::footprint(self.ring_size)
    }

    /// Bytes one ring occupies in the region, rounded up to a page.
    fn ring_span(&self) -> usize {
        self.ring_footprint().next_multiple_of(PAGE)
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
        assert!(l.client_to_server_offset() + l.ring_footprint() <= l.server_to_client_offset());
        let l = ChannelLayout::new(1 << 22, 0).unwrap();
        assert_eq!(l.total_size(), 4096 + 2 * ((1 << 22) + 4096));
    }

    #[test]
    fn bad_sizes_are_refused() {
        for ring in [0, 64, 2048, 5000, 1 << 31] {
            assert_eq!(ChannelLayout::new(ring, 0), Err(GeometryError::RingSize(ring as u64)));
        }
        for window in [1, 2048, 12288, 1 << 41] {
            assert_eq!(ChannelLayout::new(4096, window), Err(GeometryError::WindowSize(window as u64)));
        }
    }
}
