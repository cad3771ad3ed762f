//! A single-producer/single-consumer ring of cache-line slots over peer-writable memory.
//!
//! # Design
//! One ring carries frames in one direction, in the spirit of Xen's vchan, but the data
//! area is cut into 64-byte slots, each stamped by the producer:
//!
//! ```text
//!  offset  0   prod          written by the producer only (free-running u32, in slots)
//!  offset 64   cons          written by the consumer only (free-running u32, in slots)
//!  offset 128  data_wanted   set by a consumer about to sleep; cleared by the producer
//!  offset 192  space_wanted  set by a producer about to sleep; cleared by the consumer
//!  offset 256  slots[size / 64]
//!
//!  slot i (at 256 + (i mod n) * 64):  payload[60] | stamp: u32 = i
//! ```
//!
//! A frame (16-byte header, then the body) is laid out across `ceil((16 + len) / 60)`
//! consecutive slots, 60 payload bytes each; every slot of it carries the stamp of its own
//! free-running index. The producer writes the payloads and the stamps of the later slots,
//! then publishes the frame with the stamp of its first slot. The consumer waits for the
//! stamp it expects at its own index: a small frame and the word that publishes it share
//! one cache line, so a message costs one line transfer instead of two (the index line,
//! then the data line) — a polled round trip on an idle pair of cores drops by about a
//! quarter (docs/BENCHMARKS.md). A slot's stamp is rewritten on every lap, so a
//! stale slot holds the previous lap's stamp, `i - n`, never `i`; [`RingProducer::init`]
//! writes those previous-lap stamps into a fresh ring.
//!
//! **Who owns what.** Each side keeps its own index privately and only *publishes* it to
//! shared memory; it never reads its own index back (the peer could have scribbled it).
//! The producer reads the consumer's index at most once per operation and validates it:
//! the in-flight slot count `prod - cons` (wrapping) must never exceed the slot count
//! (XSA-86). It keeps the last validated value and reads the index again only when that
//! value no longer leaves room, so on the hot path it does not touch the consumer's index
//! line. The consumer never reads `prod` (the producer publishes it only so a ring can be
//! re-attached); it trusts nothing but stamps: a frame is complete when every slot it
//! claims carries its own index. A frame is copied out of the ring once, into the caller's
//! buffer, and only that copy is parsed (XSA-155); a frame can claim at most the whole
//! ring, so the consumer never reads outside it.
//!
//! **Ordering.** The producer writes a frame's payload and later stamps, then stores the
//! first stamp with release (`SeqCst`, see below); the consumer loads the first stamp with
//! acquire before reading anything else of the frame. Symmetrically the consumer frees
//! slots by publishing `cons` with release. The notify-request handshake (a side sets its
//! *wanted* word, then re-checks; the other side publishes, then reads the wanted word) is
//! a store-then-load pattern on both sides, so those four accesses are `SeqCst`: the
//! *wanted* store and the re-check load on the waiting side (the first-stamp load in
//! [`RingConsumer::ready`], the index load in [`RingProducer::free_slots`]), the
//! publishing store and the *wanted* load on the other. An acquire re-check is not
//! enough: it may be satisfied before the *wanted* store is visible, and both sides then
//! miss each other (a lost wake-up; found by the loom model in `tests/loom_ring.rs`).
//!
//! **Suppression.** A producer reports "notify the peer" only when the consumer has asked
//! for it (set `data_wanted`), so a busy producer talking to a polling consumer sends no
//! notifications at all.
//!
//! **Failure.** Any violation (index out of range, impossible frame length, bad header, a
//! frame whose later slots are not stamped) stores a [`RingError`] and every later call
//! returns it: the connection is dead, and the owner tears it down.

use crate::region::SharedMemory;
use crate::wire::{FrameHeader, WireError, HEADER_LEN};
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

/// Byte offsets of the ring header fields.
pub mod field {
    /// Producer index (slots; informational: the consumer never reads it).
    pub const PROD: usize = 0;
    /// Consumer index (slots).
    pub const CONS: usize = 64;
    /// Consumer asks to be notified when data arrives.
    pub const DATA_WANTED: usize = 128;
    /// Producer asks to be notified when space frees up.
    pub const SPACE_WANTED: usize = 192;
    /// First slot.
    pub const DATA: usize = 256;
}

/// Bytes per slot: one cache line.
pub const SLOT: usize = 64;
/// Frame bytes a slot carries; the slot's last four bytes are its stamp.
pub const SLOT_PAYLOAD: usize = SLOT - 4;
/// Offset of the stamp inside a slot.
const STAMP: usize = SLOT_PAYLOAD;

/// Bytes a ring of `data_size` data bytes occupies.
pub const fn footprint(data_size: usize) -> usize {
    field::DATA + data_size
}

/// Frame bytes (header and body) a ring of `data_size` data bytes can carry in one frame.
pub const fn capacity(data_size: usize) -> usize {
    data_size / SLOT * SLOT_PAYLOAD
}

/// Slots a frame with a body of `body_len` bytes occupies.
pub const fn frame_slots(body_len: usize) -> usize {
    (HEADER_LEN + body_len).div_ceil(SLOT_PAYLOAD)
}

/// Smallest permitted data size (one slot).
pub const MIN_SIZE: usize = SLOT;
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
    /// The peer's index implies more slots in flight than the ring holds: corruption.
    IndexOutOfRange {
        /// Slots in flight the indices imply.
        in_flight: u32,
        /// Slots in the ring.
        size: u32,
    },
    /// A frame header in the ring was malformed.
    BadFrame(WireError),
    /// A frame claims more bytes than have been published: corruption.
    TruncatedFrame {
        /// Bytes the frame needs.
        need: u32,
        /// Bytes published (in whole stamped slots) or the ring's capacity.
        available: u32,
    },
    /// A frame larger than the ring could ever hold was offered for sending (a local error;
    /// the ring stays usable).
    FrameTooLarge {
        /// Total frame length.
        len: usize,
        /// Frame bytes the ring can carry ([`capacity`]).
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
                    "peer's ring index claims {in_flight} slots in flight in a {size}-slot ring; connection failed"
                )
            }
            RingError::BadFrame(e) => write!(f, "malformed frame in ring ({e}); connection failed"),
            RingError::TruncatedFrame { need, available } => {
                write!(f, "frame needs {need} bytes but peer published {available}; connection failed")
            }
            RingError::FrameTooLarge { len, size } => {
                write!(f, "frame of {len} bytes cannot fit a ring carrying {size}-byte frames")
            }
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

/// Offset of slot `index` (free-running) in a ring with slot mask `mask`.
fn slot_at(mask: u32, index: u32) -> usize {
    field::DATA + (index & mask) as usize * SLOT
}

/// Copies `dst.len()` frame bytes starting `pos` bytes into the frame whose first slot is
/// `first`, slot by slot. With `check`, each slot after the first must carry its own
/// stamp (verified just before its bytes are copied, in the same pass); `Err(k)` names the
/// first that does not (`dst` then holds a partial copy, to be discarded).
fn copy_out<M: SharedMemory>(
    mem: &M,
    mask: u32,
    first: u32,
    mut pos: usize,
    dst: &mut [u8],
    check: bool,
) -> Result<(), u32> {
    let mut done = 0;
    while done < dst.len() {
        let (slot, off) = (pos / SLOT_PAYLOAD, pos % SLOT_PAYLOAD);
        let index = first.wrapping_add(slot as u32);
        let at = slot_at(mask, index);
        if check && slot > 0 && off == 0 && mem.load_u32(at + STAMP, Relaxed) != index {
            return Err(slot as u32);
        }
        let n = (SLOT_PAYLOAD - off).min(dst.len() - done);
        mem.read_bytes(at + off, &mut dst[done..done + n]);
        done += n;
        pos += n;
    }
    Ok(())
}

/// Copies `src` into the frame whose first slot is `first`, starting `pos` bytes into it;
/// each slot after the first that it starts gets its stamp in the same pass.
fn copy_in<M: SharedMemory>(mem: &M, mask: u32, first: u32, mut pos: usize, src: &[u8]) {
    let mut done = 0;
    while done < src.len() {
        let (slot, off) = (pos / SLOT_PAYLOAD, pos % SLOT_PAYLOAD);
        let index = first.wrapping_add(slot as u32);
        let at = slot_at(mask, index);
        let n = (SLOT_PAYLOAD - off).min(src.len() - done);
        mem.write_bytes(at + off, &src[done..done + n]);
        if slot > 0 && off == 0 {
            mem.store_u32(at + STAMP, index, Relaxed);
        }
        done += n;
        pos += n;
    }
}

/// The sending end of a ring.
#[derive(Debug)]
pub struct RingProducer<M> {
    mem: M,
    /// Slot count minus one.
    mask: u32,
    prod: u32,
    /// The consumer's index as last read and validated (`prod - cons_seen <= slots`). The
    /// slots it leaves are certainly free, so a send that fits skips re-reading the index
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
        let slots = (size / SLOT) as u32;
        Ok(RingProducer {
            mem,
            mask: slots - 1,
            prod,
            // "Full" until the consumer's index has been read and checked.
            cons_seen: prod.wrapping_sub(slots),
            failed: None,
        })
    }

    /// Initialises a fresh ring (indices zero, every slot stamped as if from the previous
    /// lap) and takes its producer end.
    pub fn init(mem: M, size: usize) -> Result<Self, RingError> {
        Self::init_at(mem, size, 0)
    }

    /// [`init`](Self::init) with both indices starting at `start` (tests use it to cross
    /// the u32 wrap-around).
    pub fn init_at(mem: M, size: usize, start: u32) -> Result<Self, RingError> {
        check_geometry(&mem, size)?;
        let slots = (size / SLOT) as u32;
        for off in [field::DATA_WANTED, field::SPACE_WANTED] {
            mem.store_u32(off, 0, Relaxed);
        }
        for i in 0..slots {
            let index = start.wrapping_add(i);
            mem.store_u32(slot_at(slots - 1, index) + STAMP, index.wrapping_sub(slots), Relaxed);
        }
        mem.store_u32(field::CONS, start, Relaxed);
        mem.store_u32(field::PROD, start, Release);
        Self::attach(mem, size)
    }

    /// Slots in the ring.
    pub fn slots(&self) -> usize {
        self.mask as usize + 1
    }

    /// Frame bytes (header and body) one frame may take.
    pub fn capacity(&self) -> usize {
        self.slots() * SLOT_PAYLOAD
    }

    /// The sticky error, if the ring has failed.
    pub fn failure(&self) -> Option<RingError> {
        self.failed
    }

    fn fail(&mut self, e: RingError) -> RingError {
        self.failed = Some(e);
        e
    }

    /// Free slots, reading the consumer's index once and validating it.
    pub fn free_slots(&mut self) -> Result<usize, RingError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        // SeqCst, not just Acquire: this is also the re-check after
        // `request_space_notify` (see "Ordering" above).
        let cons = self.mem.load_u32(field::CONS, SeqCst);
        let in_flight = self.prod.wrapping_sub(cons);
        let slots = self.mask.wrapping_add(1);
        if in_flight > slots {
            return Err(self.fail(RingError::IndexOutOfRange { in_flight, size: slots }));
        }
        self.cons_seen = cons;
        Ok((slots - in_flight) as usize)
    }

    /// Writes one frame (header then body) if it fits; `Ok(None)` when the ring is full
    /// for now (backpressure: retry after waiting, nothing is dropped).
    pub fn try_send(&mut self, header: &FrameHeader, body: &[u8]) -> Result<Option<Sent>, RingError> {
        debug_assert_eq!(header.len as usize, body.len());
        let total = HEADER_LEN + body.len();
        if total > self.capacity() {
            return Err(RingError::FrameTooLarge { len: total, size: self.capacity() });
        }
        if let Some(e) = self.failed {
            return Err(e);
        }
        let need = frame_slots(body.len());
        let seen_free = self.slots() - self.prod.wrapping_sub(self.cons_seen) as usize;
        if seen_free < need && self.free_slots()? < need {
            return Ok(None);
        }
        let first = self.prod;
        // The body, each later slot stamped as it is filled (every later slot holds body
        // bytes), then the header, then the first stamp.
        copy_in(&self.mem, self.mask, first, HEADER_LEN, body);
        copy_in(&self.mem, self.mask, first, 0, &header.emit());
        // Publishes the frame; SeqCst for the notify handshake (see "Ordering" above).
        self.mem.store_u32(slot_at(self.mask, first) + STAMP, first, SeqCst);
        self.prod = first.wrapping_add(need as u32);
        self.mem.store_u32(field::PROD, self.prod, Release);
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

    /// Asks the consumer to notify us when it frees slots. Call, then re-check
    /// [`free_slots`](Self::free_slots) before blocking.
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
    /// Slot count minus one.
    mask: u32,
    cons: u32,
    max_frame: u32,
    failed: Option<RingError>,
}

impl<M> RingConsumer<M> {
    /// The same ring, its memory wrapped by `f` (which must give access to the same bytes).
    pub fn map_memory<M2>(self, f: impl FnOnce(M) -> M2) -> RingConsumer<M2> {
        let RingConsumer { mem, mask, cons, max_frame, failed } = self;
        RingConsumer { mem: f(mem), mask, cons, max_frame, failed }
    }
}

impl<M: SharedMemory> RingConsumer<M> {
    /// Takes the consumer end of a ring of `size` data bytes in `mem`, accepting bodies of
    /// at most `max_frame` bytes.
    pub fn attach(mem: M, size: usize, max_frame: u32) -> Result<Self, RingError> {
        check_geometry(&mem, size)?;
        let cons = mem.load_u32(field::CONS, Acquire);
        Ok(RingConsumer { mem, mask: (size / SLOT) as u32 - 1, cons, max_frame, failed: None })
    }

    /// Changes the largest accepted body (after the hello exchange).
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// Slots in the ring.
    pub fn slots(&self) -> usize {
        self.mask as usize + 1
    }

    /// Frame bytes (header and body) one frame may take.
    pub fn capacity(&self) -> usize {
        self.slots() * SLOT_PAYLOAD
    }

    /// The largest accepted body.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// The free-running index of the next frame's first slot.
    pub fn index(&self) -> u32 {
        self.cons
    }

    /// The sticky error, if the ring has failed.
    pub fn failure(&self) -> Option<RingError> {
        self.failed
    }

    fn fail(&mut self, e: RingError) -> RingError {
        self.failed = Some(e);
        e
    }

    fn stamp(&self, index: u32, order: core::sync::atomic::Ordering) -> u32 {
        self.mem.load_u32(slot_at(self.mask, index) + STAMP, order)
    }

    /// Whether the next frame has been published (its first slot carries our index).
    pub fn ready(&self) -> Result<bool, RingError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        // SeqCst, not just Acquire: this is also the re-check after
        // `request_data_notify` (see "Ordering" above).
        Ok(self.stamp(self.cons, SeqCst) == self.cons)
    }

    /// Copies the next frame's body into `buf` and returns its header; `Ok(None)` when the
    /// ring is empty. The header is parsed from a private copy and the body is copied out
    /// exactly once, so later writes by the peer cannot change what was validated.
    pub fn try_recv(&mut self, buf: &mut [u8]) -> Result<Option<Received>, RingError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let first = self.cons;
        if self.stamp(first, Acquire) != first {
            return Ok(None);
        }
        let mut raw = [0u8; HEADER_LEN];
        let _ = copy_out(&self.mem, self.mask, first, 0, &mut raw, false);
        let header = match FrameHeader::parse(&raw, self.max_frame) {
            Ok(h) => h,
            Err(e) => return Err(self.fail(RingError::BadFrame(e))),
        };
        let len = header.len as usize;
        let total = u32::try_from(HEADER_LEN + len).unwrap_or(u32::MAX);
        let need = frame_slots(len);
        if need > self.slots() {
            let capacity = u32::try_from(self.capacity()).unwrap_or(u32::MAX);
            return Err(self.fail(RingError::TruncatedFrame { need: total, available: capacity }));
        }
        if buf.len() < len {
            return Err(RingError::BufferTooSmall { need: len });
        }
        // The first stamp's acquire covers the later slots of an honest producer; one whose
        // stamp is wrong was never published, and the frame is corrupt (every later slot
        // holds body bytes, so the body's copy checks them all).
        if let Err(k) = copy_out(&self.mem, self.mask, first, HEADER_LEN, &mut buf[..len], true) {
            let published = u32::try_from(k as usize * SLOT_PAYLOAD).unwrap_or(u32::MAX);
            return Err(self.fail(RingError::TruncatedFrame { need: total, available: published }));
        }
        self.cons = first.wrapping_add(need as u32);
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
    /// [`ready`](Self::ready) before blocking.
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
    use std::vec::Vec;

    fn hdr(len: usize, seq: u32) -> FrameHeader {
        FrameHeader { len: len as u32, id: MessageId(0x0100), flags: Flags::empty(), seq, aux: 0 }
    }

    #[test]
    fn a_small_frame_fits_one_cache_line() {
        assert_eq!(frame_slots(0), 1);
        assert_eq!(frame_slots(SLOT_PAYLOAD - HEADER_LEN), 1);
        assert_eq!(frame_slots(SLOT_PAYLOAD - HEADER_LEN + 1), 2);
        assert_eq!(capacity(1 << 20), (1 << 20) / 64 * 60);
    }

    #[test]
    fn send_receive_and_wrap() {
        let (_buf, region) = heap_region(footprint(256));
        let mut p = RingProducer::init(&region, 256).unwrap();
        let mut c = RingConsumer::attach(&region, 256, 256).unwrap();
        let mut out = [0u8; 256];
        for seq in 0..80u32 {
            // 0..150 bytes: one, two or three slots, wrapping many times.
            let body: Vec<u8> = (0..(seq as usize * 37 % 151)).map(|i| i as u8 ^ seq as u8).collect();
            assert!(p.try_send(&hdr(body.len(), seq), &body).unwrap().is_some());
            let r = c.try_recv(&mut out).unwrap().unwrap();
            assert_eq!(r.header.seq, seq);
            assert_eq!(&out[..body.len()], &body[..]);
        }
        assert_eq!(c.try_recv(&mut out).unwrap(), None, "stale slots of earlier laps are not frames");
        assert!(!c.ready().unwrap());
    }

    #[test]
    fn full_ring_applies_backpressure() {
        let (_buf, region) = heap_region(footprint(128));
        let mut p = RingProducer::init(&region, 128).unwrap();
        let mut c = RingConsumer::attach(&region, 128, 128).unwrap();
        assert!(p.try_send(&hdr(16, 0), &[1; 16]).unwrap().is_some());
        assert!(p.try_send(&hdr(16, 1), &[2; 16]).unwrap().is_some());
        assert_eq!(p.try_send(&hdr(1, 2), &[3]).unwrap(), None, "full: must wait, not drop");
        let mut out = [0u8; 64];
        assert_eq!(c.try_recv(&mut out).unwrap().unwrap().header.seq, 0);
        assert!(p.try_send(&hdr(1, 2), &[3]).unwrap().is_some());
        assert_eq!(p.try_send(&hdr(105, 3), &[0; 105]), Err(RingError::FrameTooLarge { len: 121, size: 120 }));
        assert_eq!(c.try_recv(&mut out).unwrap().unwrap().header.seq, 1);
        assert_eq!(c.try_recv(&mut out).unwrap().unwrap().header.seq, 2);
        // A frame the size of the whole ring goes through once the ring is empty.
        assert!(p.try_send(&hdr(104, 3), &[7; 104]).unwrap().is_some());
        let mut big = [0u8; 104];
        assert_eq!(c.try_recv(&mut big).unwrap().unwrap().header.seq, 3);
        assert_eq!(big, [7; 104]);
    }

    #[test]
    fn the_consumer_trusts_stamps_not_the_producer_index() {
        let (_buf, region) = heap_region(footprint(128));
        let mut p = RingProducer::init(&region, 128).unwrap();
        let mut c = RingConsumer::attach(&region, 128, 64).unwrap();
        region.store_u32(field::PROD, 65, Release);
        let mut out = [0u8; 64];
        assert_eq!(c.try_recv(&mut out), Ok(None), "a moved producer index publishes nothing");
        // A stamp from another lap does not publish the slot either.
        region.store_u32(field::DATA + STAMP, 2, Release);
        assert_eq!(c.try_recv(&mut out), Ok(None));
        assert!(p.try_send(&hdr(3, 9), &[1, 2, 3]).unwrap().is_some());
        assert_eq!(c.try_recv(&mut out).unwrap().unwrap().header.seq, 9);
    }

    #[test]
    fn corrupt_consumer_index_fails_producer() {
        let (_buf, region) = heap_region(footprint(256));
        let mut p = RingProducer::init(&region, 256).unwrap();
        assert!(p.try_send(&hdr(0, 0), &[]).unwrap().is_some());
        region.store_u32(field::CONS, 0x8000_0000, Release);
        // Detected as soon as the producer needs the index again: when the space it last
        // saw free runs out (three more frames here), or on an explicit check.
        for seq in 1..4 {
            assert!(p.try_send(&hdr(0, seq), &[]).unwrap().is_some());
        }
        assert!(matches!(p.try_send(&hdr(0, 4), &[]), Err(RingError::IndexOutOfRange { .. })));
        assert!(matches!(p.free_slots(), Err(RingError::IndexOutOfRange { .. })), "sticky");
    }

    #[test]
    fn lying_length_fails_instead_of_overreading() {
        let (_buf, region) = heap_region(footprint(256));
        let mut p = RingProducer::init(&region, 256).unwrap();
        let mut c = RingConsumer::attach(&region, 256, 1 << 20).unwrap();
        assert!(p.try_send(&hdr(4, 0), &[9; 4]).unwrap().is_some());
        // Peer rewrites the length field after publishing: claims 100 body bytes (two
        // slots), but only the first slot was stamped.
        region.write_bytes(field::DATA, &100u32.to_le_bytes());
        let mut out = [0u8; 128];
        assert_eq!(c.try_recv(&mut out), Err(RingError::TruncatedFrame { need: 116, available: 60 }));
        assert_eq!(c.try_recv(&mut out), Err(RingError::TruncatedFrame { need: 116, available: 60 }), "sticky");
    }

    #[test]
    fn a_frame_larger_than_the_ring_is_corruption() {
        let (_buf, region) = heap_region(footprint(64));
        let mut c = RingConsumer::attach(&region, 64, 1 << 20).unwrap();
        let forged = hdr(100, 0).emit();
        region.write_bytes(field::DATA, &forged);
        region.store_u32(field::DATA + STAMP, 0, Release);
        let mut out = [0u8; 128];
        assert_eq!(c.try_recv(&mut out), Err(RingError::TruncatedFrame { need: 116, available: 60 }));
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
        let (_buf, region) = heap_region(footprint(256));
        let mut p = RingProducer::init(&region, 256).unwrap();
        let mut c = RingConsumer::attach(&region, 256, 64).unwrap();
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
        let (_buf, region) = heap_region(footprint(256));
        let mut p = RingProducer::init_at(&region, 256, u32::MAX - 6).unwrap();
        let mut c = RingConsumer::attach(&region, 256, 256).unwrap();
        let mut out = [0u8; 256];
        for seq in 0..12 {
            // One- and two-slot frames, so frames straddle the u32 wrap as well.
            let len = if seq % 2 == 0 { 10 } else { 70 };
            let body = [seq as u8; 70];
            assert!(p.try_send(&hdr(len, seq), &body[..len]).unwrap().is_some());
            let r = c.try_recv(&mut out).unwrap().unwrap();
            assert_eq!((r.header.seq, &out[..len]), (seq, &body[..len]));
        }
        assert_eq!(c.try_recv(&mut out), Ok(None));
    }
}
