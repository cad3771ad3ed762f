//! A single-producer/single-consumer byte ring over peer-writable memory.
//!
//! # Design
//! One ring carries frames in one direction, in the spirit of Xen's vchan:
//!
//! ```text
//!  offset  0   prod          written by the producer only (free-running u32)
//!  offset 64   cons          written by the consumer only (free-running u32)
//!  offset 128  data_wanted   set by a consumer about to sleep; cleared by the producer
//!  offset 192  space_wanted  set by a producer about to sleep; cleared by the consumer
//!  offset 256  data[size]    size is a power of two; byte i lives at data[i & (size-1)]
//! ```
//!
//! Each index sits on its own cache line so the two sides do not false-share.
//!
//! **Who owns what.** Each side keeps its own index privately and only *publishes* it to
//! shared memory; it never reads its own index back (the peer could have scribbled it).
//! The other side's index is read at most once per operation and validated: the in-flight
//! byte count `prod - cons` (wrapping) must never exceed `size` (XSA-86). Each side keeps
//! the last validated value and reads the index again only when that value no longer
//! covers the operation (no frame left to receive, not enough space to send), so on the
//! hot path neither side touches the other's index line. A frame is copied out
//! of the ring once, into the caller's buffer, and only that copy is parsed (XSA-155).
//!
//! **Ordering.** The producer writes frame bytes, then publishes `prod` with release;
//! the consumer reads `prod` with acquire before reading bytes. Symmetrically for `cons`
//! and the space it frees. The notify-request handshake (a side sets its *wanted* word,
//! then re-checks the index; the other side publishes its index, then reads the wanted
//! word) is a store-then-load pattern on both sides, so those four accesses are `SeqCst`:
//! the *wanted* store and the index re-load (every index load in [`RingProducer::free_space`]
//! and [`RingConsumer::available`], which double as the re-check) on the waiting side, the
//! index store and the *wanted* load on the other. An acquire re-load is not enough: it may
//! be satisfied before the *wanted* store is visible, and both sides then miss each other
//! (a lost wake-up; found by the loom model in `tests/loom_ring.rs`).
//!
//! **Suppression.** A producer reports "notify the peer" only when the consumer has asked
//! for it (set `data_wanted`), so a busy producer talking to a polling consumer sends no
//! notifications at all.
//!
//! **Failure.** Any violation (index out of range, impossible frame length, bad header)
//! stores a [`RingError`] and every later call returns it: the connection is dead, and
//! the owner tears it down.

use crate::region::SharedMemory;
use crate::wire::{FrameHeader, WireError, HEADER_LEN};
use core::sync::atomic::Ordering::{Acquire, Relaxed, SeqCst};

/// Byte offsets of the ring header fields.
pub mod field {
    /// Producer index.
    pub const PROD: usize = 0;
    /// Consumer index.
    pub const CONS: usize = 64;
    /// Consumer asks to be notified when data arrives.
    pub const DATA_WANTED: usize = 128;
    /// Producer asks to be notified when space frees up.
    pub const SPACE_WANTED: usize = 192;
    /// First data byte.
    pub const DATA: usize = 256;
}

/// Bytes a ring of `data_size` data bytes occupies.
pub const fn footprint(data_size: usize) -> usize {
    field::DATA + data_size
}

/// Smallest permitted data size.
pub const MIN_SIZE: usize = 64;
/// Largest permitted data size (indices are u32, so in-flight must fit well inside).
pub const MAX_SIZE: usize = 1 << 30;

/// Why a ring operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum RingError {
    /// The region is too small for the requested size, or the size is not a power of two
    /// in `MIN_SIZE..=MAX_SIZE` (a local configuration error).
    BadGeometry,
    /// The peer's index implies more bytes in flight than the ring holds: corruption.
    IndexOutOfRange {
        /// Bytes in flight the indices imply.
        in_flight: u32,
        /// Ring size.
        size: u32,
    },
    /// A frame header in the ring was malformed.
    BadFrame(WireError),
    /// A frame claims more bytes than have been published: corruption.
    TruncatedFrame {
        /// Bytes the frame needs.
        need: u32,
        /// Bytes published.
        available: u32,
    },
    /// A frame larger than the ring could ever hold was offered for sending (a local error;
    /// the ring stays usable).
    FrameTooLarge {
        /// Total frame length.
        len: usize,
        /// Ring size.
        size: usize,
    },
    /// The caller's buffer is smaller than the frame (a local error; nothing consumed).
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
    },
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RingError::BadGeometry => {
                write!(f, "ring size must be a power of two between {MIN_SIZE} and {MAX_SIZE} bytes and fit the region")
            }
            RingError::IndexOutOfRange { in_flight, size } => {
                write!(
                    f,
                    "peer's ring index claims {in_flight} bytes in flight in a {size}-byte ring; connection failed"
                )
            }
            RingError::BadFrame(e) => write!(f, "malformed frame in ring ({e}); connection failed"),
            RingError::TruncatedFrame { need, available } => {
                write!(f, "frame needs {need} bytes but peer published {available}; connection failed")
            }
            RingError::FrameTooLarge { len, size } => write!(f, "frame of {len} bytes cannot fit a {size}-byte ring"),
            RingError::BufferTooSmall { need } => write!(f, "receive buffer too small: frame needs {need} bytes"),
        }
    }
}

impl core::error::Error for RingError {}

impl RingError {
    /// Whether the error means the peer broke the protocol (the connection is dead).
    pub fn is_fatal(&self) -> bool {
        matches!(self, RingError::IndexOutOfRange { .. } | RingError::BadFrame(_) | RingError::TruncatedFrame { .. })
    }
}

fn check_geometry<M: SharedMemory>(mem: &M, size: usize) -> Result<(), RingError> {
    if !size.is_power_of_two() || !(MIN_SIZE..=MAX_SIZE).contains(&size) || mem.size() < footprint(size) {
        return Err(RingError::BadGeometry);
    }
    Ok(())
}

/// Copies `dst.len()` bytes starting at ring position `pos`, wrapping at the end.
fn copy_out<M: SharedMemory>(mem: &M, mask: u32, pos: u32, dst: &mut [u8]) {
    let start = (pos & mask) as usize;
    let size = mask as usize + 1;
    let first = dst.len().min(size - start);
    let (a, b) = dst.split_at_mut(first);
    mem.read_bytes(field::DATA + start, a);
    if !b.is_empty() {
        mem.read_bytes(field::DATA, b);
    }
}

/// Copies `src` into the ring starting at position `pos`, wrapping at the end.
fn copy_in<M: SharedMemory>(mem: &M, mask: u32, pos: u32, src: &[u8]) {
    let start = (pos & mask) as usize;
    let size = mask as usize + 1;
    let first = src.len().min(size - start);
    mem.write_bytes(field::DATA + start, &src[..first]);
    if first < src.len() {
        mem.write_bytes(field::DATA, &src[first..]);
    }
}

/// The sending end of a ring.
#[derive(Debug)]
pub struct RingProducer<M> {
    mem: M,
    mask: u32,
    prod: u32,
    /// The consumer's index as last read and validated (`prod - cons_seen <= size`). The
    /// space it leaves is certainly free, so a send that fits skips re-reading the index
    /// and the producer stays off the consumer's cache line on the hot path.
    cons_seen: u32,
    failed: Option<RingError>,
}

impl<M> RingProducer<M> {
    /// The same ring, its memory wrapped by `f` (which must give access to the same bytes).
    pub fn map_memory<M2>(self, f: impl FnOnce(M) -> M2) -> RingProducer<M2> {
        let RingProducer { mem, mask, prod, cons_seen, failed } = self;
        RingProducer { mem: f(mem), mask, prod, cons_seen, failed }
    }
}

/// Outcome of a successful send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Sent {
    /// The consumer asked to be woken: notify it.
    pub notify: bool,
}

impl<M: SharedMemory> RingProducer<M> {
    /// Takes the producer end of a ring of `size` data bytes laid out in `mem`, starting
    /// from the index currently published there (zero for a fresh ring).
    ///
    /// The side that creates the region initialises it with [`RingProducer::init`].
    pub fn attach(mem: M, size: usize) -> Result<Self, RingError> {
        check_geometry(&mem, size)?;
        let prod = mem.load_u32(field::PROD, Acquire);
        Ok(RingProducer {
            mem,
            mask: (size - 1) as u32,
            prod,
            // "Full" until the consumer's index has been read and checked.
            cons_seen: prod.wrapping_sub(size as u32),
            failed: None,
        })
    }

    /// Zeroes the header of a fresh ring and takes its producer end.
    pub fn init(mem: M, size: usize) -> Result<Self, RingError> {
        check_geometry(&mem, size)?;
        for off in [field::PROD, field::CONS, field::DATA_WANTED, field::SPACE_WANTED] {
            mem.store_u32(off, 0, Relaxed);
        }
        Self::attach(mem, size)
    }

    /// Data size of the ring.
    pub fn size(&self) -> usize {
        self.mask as usize + 1
    }

    /// The sticky error, if the ring has failed.
    pub fn failure(&self) -> Option<RingError> {
        self.failed
    }

    fn fail(&mut self, e: RingError) -> RingError {
        self.failed = Some(e);
        e
    }

    /// Bytes free for writing, reading the consumer's index once and validating it.
    pub fn free_space(&mut self) -> Result<usize, RingError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        // SeqCst, not just Acquire: this is also the re-check after
        // `request_space_notify` (see "Ordering" above).
        let cons = self.mem.load_u32(field::CONS, SeqCst);
        let in_flight = self.prod.wrapping_sub(cons);
        let size = self.mask.wrapping_add(1);
        if in_flight > size {
            return Err(self.fail(RingError::IndexOutOfRange { in_flight, size }));
        }
        self.cons_seen = cons;
        Ok((size - in_flight) as usize)
    }

    /// Writes one frame (header then body) if it fits; `Ok(None)` when the ring is full
    /// for now (backpressure: retry after waiting, nothing is dropped).
    pub fn try_send(&mut self, header: &FrameHeader, body: &[u8]) -> Result<Option<Sent>, RingError> {
        debug_assert_eq!(header.len as usize, body.len());
        let total = HEADER_LEN + body.len();
        if total > self.size() {
            return Err(RingError::FrameTooLarge { len: total, size: self.size() });
        }
        if let Some(e) = self.failed {
            return Err(e);
        }
        let seen_free = self.size() - self.prod.wrapping_sub(self.cons_seen) as usize;
        if seen_free < total && self.free_space()? < total {
            return Ok(None);
        }
        copy_in(&self.mem, self.mask, self.prod, &header.emit());
        copy_in(&self.mem, self.mask, self.prod.wrapping_add(HEADER_LEN as u32), body);
        self.prod = self.prod.wrapping_add(total as u32);
        self.mem.store_u32(field::PROD, self.prod, SeqCst);
        Ok(Some(Sent { notify: self.take_request(field::DATA_WANTED) }))
    }

    fn take_request(&self, off: usize) -> bool {
        if self.mem.load_u32(off, SeqCst) != 0 {
            self.mem.store_u32(off, 0, Relaxed);
            true
        } else {
            false
        }
    }

    /// Asks the consumer to notify us when it frees space. Call, then re-check
    /// [`free_space`](Self::free_space) before blocking.
    pub fn request_space_notify(&self) {
        self.mem.store_u32(field::SPACE_WANTED, 1, SeqCst);
    }
}

/// A received frame: its checked header and where its body sits in the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// The frame header, parsed from a private copy.
    pub header: FrameHeader,
    /// The producer asked to be woken when space frees up: notify it.
    pub notify: bool,
}

/// The receiving end of a ring.
#[derive(Debug)]
pub struct RingConsumer<M> {
    mem: M,
    mask: u32,
    cons: u32,
    /// The producer's index as last read and validated (`prod_seen - cons <= size`). Frames
    /// before it are published, so while any remain the consumer does not re-read the
    /// index, and a backlog is drained without touching the producer's cache line.
    prod_seen: u32,
    max_frame: u32,
    failed: Option<RingError>,
}

impl<M> RingConsumer<M> {
    /// The same ring, its memory wrapped by `f` (which must give access to the same bytes).
    pub fn map_memory<M2>(self, f: impl FnOnce(M) -> M2) -> RingConsumer<M2> {
        let RingConsumer { mem, mask, cons, prod_seen, max_frame, failed } = self;
        RingConsumer { mem: f(mem), mask, cons, prod_seen, max_frame, failed }
    }
}

impl<M: SharedMemory> RingConsumer<M> {
    /// Takes the consumer end of a ring of `size` data bytes in `mem`, accepting bodies of
    /// at most `max_frame` bytes.
    pub fn attach(mem: M, size: usize, max_frame: u32) -> Result<Self, RingError> {
        check_geometry(&mem, size)?;
        let cons = mem.load_u32(field::CONS, Acquire);
        Ok(RingConsumer { mem, mask: (size - 1) as u32, cons, prod_seen: cons, max_frame, failed: None })
    }

    /// Changes the largest accepted body (after the hello exchange).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// Data size of the ring.
    pub fn size(&self) -> usize {
        self.mask as usize + 1
    }

    /// The largest accepted body.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// The sticky error, if the ring has failed.
    pub fn failure(&self) -> Option<RingError> {
        self.failed
    }

    fn fail(&mut self, e: RingError) -> RingError {
        self.failed = Some(e);
        e
    }

    /// Published bytes not yet consumed, reading the producer's index once.
    pub fn available(&mut self) -> Result<u32, RingError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        // SeqCst, not just Acquire: this is also the re-check after
        // `request_data_notify` (see "Ordering" above).
        let prod = self.mem.load_u32(field::PROD, SeqCst);
        let in_flight = prod.wrapping_sub(self.cons);
        let size = self.mask.wrapping_add(1);
        if in_flight > size {
            return Err(self.fail(RingError::IndexOutOfRange { in_flight, size }));
        }
        self.prod_seen = prod;
        Ok(in_flight)
    }

    /// Copies the next frame's body into `buf` and returns its header; `Ok(None)` when the
    /// ring is empty. The header is parsed from a private copy and the body is copied out
    /// exactly once, so later writes by the peer cannot change what was validated.
    pub fn try_recv(&mut self, buf: &mut [u8]) -> Result<Option<Received>, RingError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let mut available = self.prod_seen.wrapping_sub(self.cons);
        if available == 0 {
            available = self.available()?;
            if available == 0 {
                return Ok(None);
            }
        }
        if (available as usize) < HEADER_LEN {
            return Err(self.fail(RingError::TruncatedFrame { need: HEADER_LEN as u32, available }));
        }
        let mut raw = [0u8; HEADER_LEN];
        copy_out(&self.mem, self.mask, self.cons, &mut raw);
        let header = match FrameHeader::parse(&raw, self.max_frame) {
            Ok(h) => h,
            Err(e) => return Err(self.fail(RingError::BadFrame(e))),
        };
        // `len <= max_frame <= u32::MAX`; the sum is computed in u64 so it cannot wrap.
        let need = HEADER_LEN as u64 + u64::from(header.len);
        if need > u64::from(available) {
            return Err(self.fail(RingError::TruncatedFrame { need: need.min(u64::from(u32::MAX)) as u32, available }));
        }
        let len = header.len as usize;
        if buf.len() < len {
            return Err(RingError::BufferTooSmall { need: len });
        }
        copy_out(&self.mem, self.mask, self.cons.wrapping_add(HEADER_LEN as u32), &mut buf[..len]);
        self.cons = self.cons.wrapping_add(need as u32);
        self.mem.store_u32(field::CONS, self.cons, SeqCst);
        let notify = if self.mem.load_u32(field::SPACE_WANTED, SeqCst) != 0 {
            self.mem.store_u32(field::SPACE_WANTED, 0, Relaxed);
            true
        } else {
            false
        };
        Ok(Some(Received { header, notify }))
    }

    /// Asks the producer to notify us when data arrives. Call, then re-check
    /// [`available`](Self::available) before blocking.
    pub fn request_data_notify(&self) {
        self.mem.store_u32(field::DATA_WANTED, 1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::region::test_utils::heap_region;
    use crate::wire::{Flags, MessageId};
    use core::sync::atomic::Ordering::Release;
    use std::vec::Vec;

    fn hdr(len: usize, seq: u32) -> FrameHeader {
        FrameHeader { len: len as u32, id: MessageId(0x0100), flags: Flags::empty(), seq, aux: 0 }
    }

    #[test]
    fn send_receive_and_wrap() {
        let (_buf, region) = heap_region(footprint(64));
        let mut p = RingProducer::init(&region, 64).unwrap();
        let mut c = RingConsumer::attach(&region, 64, 64).unwrap();
        let mut out = [0u8; 64];
        for seq in 0..50u32 {
            let body: Vec<u8> = (0..(seq as usize % 30)).map(|i| i as u8 ^ seq as u8).collect();
            assert!(p.try_send(&hdr(body.len(), seq), &body).unwrap().is_some());
            let r = c.try_recv(&mut out).unwrap().unwrap();
            assert_eq!(r.header.seq, seq);
            assert_eq!(&out[..body.len()], &body[..]);
        }
        assert_eq!(c.try_recv(&mut out).unwrap(), None);
    }

    #[test]
    fn full_ring_applies_backpressure() {
        let (_buf, region) = heap_region(footprint(64));
        let mut p = RingProducer::init(&region, 64).unwrap();
        let mut c = RingConsumer::attach(&region, 64, 64).unwrap();
        assert!(p.try_send(&hdr(16, 0), &[1; 16]).unwrap().is_some());
        assert!(p.try_send(&hdr(16, 1), &[2; 16]).unwrap().is_some());
        assert_eq!(p.try_send(&hdr(1, 2), &[3]).unwrap(), None, "full: must wait, not drop");
        let mut out = [0u8; 64];
        assert_eq!(c.try_recv(&mut out).unwrap().unwrap().header.seq, 0);
        assert!(p.try_send(&hdr(1, 2), &[3]).unwrap().is_some());
        assert_eq!(p.try_send(&hdr(60, 3), &[0; 60]), Err(RingError::FrameTooLarge { len: 76, size: 64 }));
    }

    #[test]
    fn corrupt_producer_index_fails_connection() {
        let (_buf, region) = heap_region(footprint(64));
        let _p = RingProducer::init(&region, 64).unwrap();
        let mut c = RingConsumer::attach(&region, 64, 64).unwrap();
        region.store_u32(field::PROD, 65, Release);
        let mut out = [0u8; 64];
        let e = c.try_recv(&mut out).unwrap_err();
        assert_eq!(e, RingError::IndexOutOfRange { in_flight: 65, size: 64 });
        // Sticky: fixing the index does not revive the connection.
        region.store_u32(field::PROD, 0, Release);
        assert_eq!(c.try_recv(&mut out), Err(e));
    }

    #[test]
    fn corrupt_consumer_index_fails_producer() {
        let (_buf, region) = heap_region(footprint(64));
        let mut p = RingProducer::init(&region, 64).unwrap();
        assert!(p.try_send(&hdr(0, 0), &[]).unwrap().is_some());
        region.store_u32(field::CONS, 0x8000_0000, Release);
        // Detected as soon as the producer needs the index again: when the space it last
        // saw free runs out (three more frames here), or on an explicit check.
        for seq in 1..4 {
            assert!(p.try_send(&hdr(0, seq), &[]).unwrap().is_some());
        }
        assert!(matches!(p.try_send(&hdr(0, 4), &[]), Err(RingError::IndexOutOfRange { .. })));
    }

    #[test]
    fn lying_length_fails_instead_of_overreading() {
        let (_buf, region) = heap_region(footprint(64));
        let mut p = RingProducer::init(&region, 64).unwrap();
        let mut c = RingConsumer::attach(&region, 64, 1 << 20).unwrap();
        assert!(p.try_send(&hdr(4, 0), &[9; 4]).unwrap().is_some());
        // Peer rewrites the length field after publishing: claims 40 body bytes, 4 exist.
        region.write_bytes(field::DATA, &40u32.to_le_bytes());
        let mut out = [0u8; 64];
        assert_eq!(c.try_recv(&mut out), Err(RingError::TruncatedFrame { need: 56, available: 20 }));
    }

    #[test]
    fn partial_header_is_corruption() {
        let (_buf, region) = heap_region(footprint(64));
        let mut c = RingConsumer::attach(&region, 64, 64).unwrap();
        region.store_u32(field::PROD, 7, Release);
        let mut out = [0u8; 64];
        assert!(matches!(c.try_recv(&mut out), Err(RingError::TruncatedFrame { need: 16, available: 7 })));
    }

    #[test]
    fn oversize_frame_is_refused_on_receive() {
        let (_buf, region) = heap_region(footprint(256));
        let mut p = RingProducer::init(&region, 256).unwrap();
        let mut c = RingConsumer::attach(&region, 256, 8).unwrap();
        assert!(p.try_send(&hdr(9, 0), &[0; 9]).unwrap().is_some());
        let mut out = [0u8; 64];
        assert_eq!(c.try_recv(&mut out), Err(RingError::BadFrame(WireError::FrameTooLarge { len: 9, max: 8 })));
    }

    #[test]
    fn small_buffer_is_a_local_error_and_consumes_nothing() {
        let (_buf, region) = heap_region(footprint(64));
        let mut p = RingProducer::init(&region, 64).unwrap();
        let mut c = RingConsumer::attach(&region, 64, 64).unwrap();
        assert!(p.try_send(&hdr(8, 5), &[1; 8]).unwrap().is_some());
        assert_eq!(c.try_recv(&mut [0u8; 4]), Err(RingError::BufferTooSmall { need: 8 }));
        assert_eq!(c.try_recv(&mut [0u8; 8]).unwrap().unwrap().header.seq, 5);
    }

    #[test]
    fn notification_is_suppressed_unless_requested() {
        let (_buf, region) = heap_region(footprint(128));
        let mut p = RingProducer::init(&region, 128).unwrap();
        let mut c = RingConsumer::attach(&region, 128, 64).unwrap();
        assert_eq!(p.try_send(&hdr(1, 0), &[0]).unwrap(), Some(Sent { notify: false }));
        c.request_data_notify();
        assert_eq!(p.try_send(&hdr(1, 1), &[0]).unwrap(), Some(Sent { notify: true }));
        assert_eq!(p.try_send(&hdr(1, 2), &[0]).unwrap(), Some(Sent { notify: false }), "one request, one notify");
        let mut out = [0u8; 8];
        assert!(!c.try_recv(&mut out).unwrap().unwrap().notify);
        p.request_space_notify();
        assert!(c.try_recv(&mut out).unwrap().unwrap().notify);
    }

    #[test]
    fn bad_geometry_is_refused() {
        let (_buf, region) = heap_region(footprint(64));
        assert_eq!(RingProducer::init(&region, 96).unwrap_err(), RingError::BadGeometry);
        assert_eq!(RingProducer::init(&region, 128).unwrap_err(), RingError::BadGeometry);
        assert_eq!(RingConsumer::attach(&region, 32, 8).unwrap_err(), RingError::BadGeometry);
    }

    #[test]
    fn indices_wrap_around_u32() {
        let (_buf, region) = heap_region(footprint(64));
        region.store_u32(field::PROD, u32::MAX - 20, Relaxed);
        region.store_u32(field::CONS, u32::MAX - 20, Relaxed);
        let mut p = RingProducer::attach(&region, 64).unwrap();
        let mut c = RingConsumer::attach(&region, 64, 64).unwrap();
        let mut out = [0u8; 64];
        for seq in 0..10 {
            assert!(p.try_send(&hdr(10, seq), &[seq as u8; 10]).unwrap().is_some());
            let r = c.try_recv(&mut out).unwrap().unwrap();
            assert_eq!((r.header.seq, &out[..10]), (seq, &[seq as u8; 10][..]));
        }
    }
}
