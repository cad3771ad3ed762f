//! Fuzz harnesses for idm-core, shared by the cargo-fuzz targets (`fuzz_targets/`) and by
//! idm-core's `tests/fuzz_corpus.rs`, which replays the committed corpus in plain
//! `cargo test` (and under Miri) and keeps the seed files current.
//!
//! A harness panics only when idm-core breaks a promise; hostile input must come back as
//! an error. The seeds ([`seeds`]) come from the unit tests' fixtures.
#![allow(unsafe_code)]
#![allow(dead_code)] // Each includer uses a different part.

use idm_core::idm_messages;
use idm_core::region::{RawRegion, SharedMemory};
use idm_core::ring::{capacity, field, footprint, frame_slots, RingConsumer, RingError, RingProducer, SLOT};
use idm_core::stream::read_frame;
use idm_core::wire::proto::{ErrorKind, ErrorReply, Hello, HelloAck};
use idm_core::wire::{
    decode_body, encode_body, Flags, FrameHeader, Message, MessageId, BOOTSTRAP_MAX_FRAME, HEADER_LEN,
};
use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::Ordering::{Relaxed, Release};

idm_messages! {
    /// Every protocol message, decoded by id as a server's dispatch does.
    pub enum Proto { Hello(Hello), HelloAck(HelloAck), ErrorReply(ErrorReply) }
}

/// Decodes `body` as `M`; whatever decodes must re-encode to an equal value.
fn decode_stable<M: Message + PartialEq + core::fmt::Debug>(body: &[u8]) {
    if let Ok(m) = decode_body::<M>(body) {
        let mut buf = [0u8; 64];
        let again = encode_body(&m, &mut buf).expect("a decoded protocol message re-encodes");
        assert_eq!(decode_body::<M>(again).unwrap(), m);
    }
}

/// `frame_decode`: the input is a frame (header then body) from a hostile peer.
pub fn frame_decode(data: &[u8]) {
    for max in [0, BOOTSTRAP_MAX_FRAME, u32::MAX] {
        if let Ok(h) = FrameHeader::parse(data, max) {
            assert!(h.len <= max);
            assert_eq!(h.emit()[..], data[..HEADER_LEN]);
        }
    }
    let rest = data.get(HEADER_LEN..).unwrap_or(&[]);
    decode_stable::<Hello>(rest);
    decode_stable::<HelloAck>(rest);
    decode_stable::<ErrorReply>(rest);
    if let Ok(h) = FrameHeader::parse(data, u32::MAX) {
        if let Some(body) = rest.get(..h.len as usize) {
            if let Ok(m) = Proto::decode(h.id, body) {
                assert_eq!(m.id(), h.id);
            }
        }
    }
    // The same bytes as a byte stream of frames: bounded, every frame within its limits.
    let mut stream = data;
    let mut buf = [0u8; BOOTSTRAP_MAX_FRAME as usize];
    for _ in 0..=data.len() / HEADER_LEN {
        match read_frame(&mut stream, &mut buf, BOOTSTRAP_MAX_FRAME) {
            Ok(h) => assert!(h.len <= BOOTSTRAP_MAX_FRAME),
            Err(_) => break,
        }
    }
}

/// Zeroed, 8-byte aligned heap memory and a region over it (the region is dropped first).
struct HeapRegion {
    region: RawRegion,
    _buf: Vec<u64>,
}

impl HeapRegion {
    fn new(bytes: usize) -> Self {
        let mut buf = vec![0u64; bytes.div_ceil(8)];
        let ptr = NonNull::new(buf.as_mut_ptr().cast::<u8>()).expect("Vec pointer is non-null");
        // SAFETY: a Vec<u64> buffer is 8-byte aligned and at least `bytes` long; it lives in
        // `_buf` next to the region and is only accessed through the region, and moving the
        // Vec does not move its heap buffer.
        let region = unsafe { RawRegion::new(ptr, bytes) };
        HeapRegion { region, _buf: buf }
    }
}

/// One step of `ring_ops`, decoded from the input.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Send a frame with this body length (may exceed the ring: a local error).
    Send(u16),
    /// Receive into a buffer as large as the ring.
    Recv,
    /// Receive into a buffer of this many bytes (modulo the ring size, plus one).
    RecvInto(u16),
    /// Corrupt a header word (0 prod, 1 cons, 2 data_wanted, 3 space_wanted).
    SetIndex { which: u8, value: IndexValue },
    /// Overwrite a data byte (offset modulo the ring size).
    SetData { offset: u16, value: u8 },
    /// The consumer asks to be notified of data.
    RequestData,
    /// The producer asks to be notified of space.
    RequestSpace,
    /// Both sides read the peer's index.
    Query,
}

/// A corrupt index value: absolute, or relative to what is there now.
#[derive(Clone, Copy, Debug)]
pub enum IndexValue {
    Absolute(u32),
    Delta(i16),
}

/// The ring `ring_ops` runs on, decoded from the first six input bytes.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// Data size is `64 << (size_log2 % 5)`.
    pub size_log2: u8,
    /// The consumer's frame limit is `max_frame * 8`, or the largest body for 0xff.
    pub max_frame: u8,
    /// Both indices start here.
    pub start: u32,
}

/// Encodes a setup and operations in `ring_ops`'s input format (for seeds).
pub fn encode_ops(setup: Setup, ops: &[Op]) -> Vec<u8> {
    let mut out = vec![setup.size_log2, setup.max_frame];
    out.extend_from_slice(&setup.start.to_le_bytes());
    for op in ops {
        match *op {
            Op::Send(n) => {
                out.push(0);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Op::Recv => out.push(1),
            Op::RecvInto(n) => {
                out.push(2);
                out.extend_from_slice(&n.to_le_bytes());
            }
            Op::SetIndex { which, value } => {
                out.extend_from_slice(&[3, which]);
                match value {
                    IndexValue::Absolute(v) => {
                        out.push(0);
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                    IndexValue::Delta(d) => {
                        out.push(1);
                        out.extend_from_slice(&d.to_le_bytes());
                    }
                }
            }
            Op::SetData { offset, value } => {
                out.push(4);
                out.extend_from_slice(&offset.to_le_bytes());
                out.push(value);
            }
            Op::RequestData => out.push(5),
            Op::RequestSpace => out.push(6),
            Op::Query => out.push(7),
        }
    }
    out
}

/// Decodes `ring_ops`'s input; a truncated last operation is dropped.
pub fn decode_ops(data: &[u8]) -> Option<(Setup, Vec<Op>)> {
    let (head, mut rest) = data.split_first_chunk::<6>()?;
    let setup = Setup {
        size_log2: head[0],
        max_frame: head[1],
        start: u32::from_le_bytes([head[2], head[3], head[4], head[5]]),
    };
    fn take<const N: usize>(rest: &mut &[u8]) -> Option<[u8; N]> {
        let (a, b) = rest.split_first_chunk::<N>()?;
        *rest = b;
        Some(*a)
    }
    let mut ops = Vec::new();
    while let Some([code]) = take::<1>(&mut rest) {
        let op = match code % 8 {
            0 => Op::Send(u16::from_le_bytes(take(&mut rest)?)),
            1 => Op::Recv,
            2 => Op::RecvInto(u16::from_le_bytes(take(&mut rest)?)),
            3 => {
                let [which, mode] = take(&mut rest)?;
                let value = if mode % 2 == 0 {
                    IndexValue::Absolute(u32::from_le_bytes(take(&mut rest)?))
                } else {
                    IndexValue::Delta(i16::from_le_bytes(take(&mut rest)?))
                };
                Op::SetIndex { which, value }
            }
            4 => {
                let [a, b, value] = take(&mut rest)?;
                Op::SetData { offset: u16::from_le_bytes([a, b]), value }
            }
            5 => Op::RequestData,
            6 => Op::RequestSpace,
            _ => Op::Query,
        };
        ops.push(op);
    }
    Some((setup, ops))
}

fn frame(seq: u32, len: usize) -> (FrameHeader, Vec<u8>) {
    let header = FrameHeader {
        len: len as u32,
        id: MessageId(0x0100 + (seq % 5) as u16),
        flags: Flags::NO_REPLY,
        seq,
        aux: !seq,
    };
    let body = (0..len).map(|i| (seq as u8).wrapping_mul(31) ^ i as u8).collect();
    (header, body)
}

/// What a side's last fatal error was, to check it stays sticky.
fn check_sticky(first: &mut Option<RingError>, now: RingError) {
    match *first {
        Some(e) => assert_eq!(now, e, "a fatal ring error is sticky"),
        None if now.is_fatal() => *first = Some(now),
        None => {}
    }
}

/// `ring_ops`: the input is a ring geometry and a sequence of operations by a producer,
/// a consumer and a hostile peer writing the shared memory. Until the first corruption the
/// ring must behave exactly like a queue of frames (checked against a model); after it,
/// only errors may result, fatal ones sticky, and no frame may exceed its limits.
pub fn ring_ops(data: &[u8]) {
    let Some((setup, ops)) = decode_ops(data) else {
        return;
    };
    let size = 64usize << (setup.size_log2 % 5);
    let (slots, capacity) = (size / SLOT, capacity(size));
    let max_body = capacity - HEADER_LEN;
    let max_frame = if setup.max_frame == 0xff { max_body as u32 } else { u32::from(setup.max_frame) * 8 };
    let heap = HeapRegion::new(footprint(size));
    let mem = &heap.region;
    let mut p = RingProducer::init_at(mem, size, setup.start).unwrap();
    let mut c = RingConsumer::attach(mem, size, max_frame).unwrap();

    // The model, valid until the first corruption.
    let mut corrupted = false;
    let mut queue: VecDeque<(u32, usize)> = VecDeque::new();
    let mut used = 0usize;
    let (mut data_wanted, mut space_wanted) = (false, false);
    let mut next_seq = 0u32;
    let (mut p_failed, mut c_failed) = (None, None);
    let mut buf = vec![0u8; size];

    for op in ops {
        match op {
            Op::Send(n) => {
                let len = usize::from(n) % (2 * size);
                let total = HEADER_LEN + len;
                let (h, body) = frame(next_seq, len);
                match p.try_send(&h, &body) {
                    Ok(sent) => {
                        assert!(total <= capacity && p_failed.is_none());
                        if !corrupted {
                            assert_eq!(sent.is_some(), used + frame_slots(len) <= slots, "backpressure");
                        }
                        if let Some(sent) = sent {
                            if !corrupted {
                                assert_eq!(sent.notify, data_wanted, "notify iff requested");
                                data_wanted = false;
                                queue.push_back((next_seq, len));
                                used += frame_slots(len);
                            }
                            next_seq += 1;
                        }
                    }
                    Err(RingError::FrameTooLarge { len: l, size: s }) => {
                        assert_eq!((l, s), (total, capacity));
                        assert!(total > capacity);
                    }
                    Err(e) => {
                        assert!(corrupted, "uncorrupted ring failed: {e:?}");
                        assert!(total <= capacity);
                        check_sticky(&mut p_failed, e);
                        assert!(e.is_fatal(), "{e:?}");
                    }
                }
            }
            Op::Recv | Op::RecvInto(_) => {
                let n = match op {
                    Op::RecvInto(n) => usize::from(n) % (size + 1),
                    _ => size,
                };
                let result = c.try_recv(&mut buf[..n]);
                match result {
                    Ok(Some(r)) => {
                        assert!(c_failed.is_none());
                        assert!(r.header.len <= max_frame && r.header.len as usize <= n);
                        if !corrupted {
                            let (seq, len) = queue.pop_front().expect("model has a frame");
                            let (h, body) = frame(seq, len);
                            assert_eq!(r.header, h, "in order");
                            assert_eq!(&buf[..len], &body[..], "intact");
                            assert_eq!(r.notify, space_wanted, "notify iff requested");
                            space_wanted = false;
                            used -= frame_slots(len);
                        }
                    }
                    Ok(None) => {
                        assert!(c_failed.is_none());
                        assert!(corrupted || queue.is_empty(), "a frame was lost");
                    }
                    Err(RingError::BufferTooSmall { need }) => {
                        assert!(c_failed.is_none());
                        assert!(need > n && need as u64 <= u64::from(max_frame));
                        if !corrupted {
                            assert_eq!(Some(need), queue.front().map(|f| f.1));
                        }
                    }
                    Err(e) => {
                        assert!(e.is_fatal(), "{e:?}");
                        if !corrupted {
                            // The only failure an honest producer can cause: a frame over
                            // the consumer's limit.
                            let len = queue.front().expect("model has a frame").1 as u32;
                            assert_eq!(
                                e,
                                RingError::BadFrame(idm_core::wire::WireError::FrameTooLarge { len, max: max_frame })
                            );
                        }
                        check_sticky(&mut c_failed, e);
                    }
                }
            }
            Op::SetIndex { which, value } => {
                corrupted = true;
                let at = [field::PROD, field::CONS, field::DATA_WANTED, field::SPACE_WANTED][usize::from(which % 4)];
                let v = match value {
                    IndexValue::Absolute(v) => v,
                    IndexValue::Delta(d) => mem.load_u32(at, Relaxed).wrapping_add(d as u32),
                };
                mem.store_u32(at, v, Release);
            }
            Op::SetData { offset, value } => {
                corrupted = true;
                mem.write_bytes(field::DATA + usize::from(offset) % size, &[value]);
            }
            Op::RequestData => {
                c.request_data_notify();
                data_wanted = true;
            }
            Op::RequestSpace => {
                p.request_space_notify();
                space_wanted = true;
            }
            Op::Query => {
                match p.free_slots() {
                    Ok(free) => {
                        assert!(p_failed.is_none() && free <= slots);
                        assert!(corrupted || free == slots - used);
                    }
                    Err(e) => {
                        assert!(corrupted && e.is_fatal(), "{e:?}");
                        check_sticky(&mut p_failed, e);
                    }
                }
                match c.ready() {
                    Ok(ready) => {
                        assert!(c_failed.is_none());
                        assert!(corrupted || ready == (used > 0));
                    }
                    Err(e) => {
                        assert!(e.is_fatal(), "{e:?}");
                        check_sticky(&mut c_failed, e);
                    }
                }
            }
        }
        assert_eq!(p.failure(), p_failed);
        assert_eq!(c.failure(), c_failed);
    }
}

/// Seed inputs, built from the unit tests' fixtures. `tests/fuzz_corpus.rs` checks that
/// `corpus/<target>/seed-*` match these.
pub mod seeds {
    use super::*;

    fn frame_bytes<M: Message>(msg: &M, flags: Flags, seq: u32) -> Vec<u8> {
        let mut buf = [0u8; 64];
        let body = encode_body(msg, &mut buf).unwrap();
        let h = FrameHeader { len: body.len() as u32, id: M::ID, flags, seq, aux: 0 };
        let mut out = h.emit().to_vec();
        out.extend_from_slice(body);
        out
    }

    /// Seeds for `frame_decode`.
    pub fn frame_decode() -> Vec<(&'static str, Vec<u8>)> {
        let hello = Hello { min_version: 1, max_version: 2, max_frame: 300 };
        let ack = HelloAck { version: 1, max_frame: 1008 };
        let error = ErrorReply { kind: ErrorKind::VersionMismatch, request_id: Hello::ID, code: 0 };
        // wire.rs's header fixture: len 5, id 0x0101, RESPONSE | NO_REPLY, seq 42.
        let mut fixture =
            vec![0x05, 0x00, 0x00, 0x00, 0x01, 0x01, 0x03, 0x00, 0x2a, 0x00, 0x00, 0x00, 0xef, 0xbe, 0xad, 0xde];
        fixture.extend_from_slice(&[1, 2, 3, 4, 5]);
        let mut oversize = frame_bytes(&hello, Flags::empty(), 0);
        oversize[..4].copy_from_slice(&65u32.to_le_bytes());
        let mut unknown_flags = frame_bytes(&hello, Flags::empty(), 0);
        unknown_flags[6] = 0x10;
        let mut two = frame_bytes(&hello, Flags::empty(), 0);
        two.extend(frame_bytes(&ack, Flags::RESPONSE, 0));
        vec![
            ("seed-hello", frame_bytes(&hello, Flags::empty(), 0)),
            ("seed-hello-ack", frame_bytes(&ack, Flags::RESPONSE, 0)),
            ("seed-error-reply", frame_bytes(&error, Flags::RESPONSE.with(Flags::ERROR), 0)),
            ("seed-header-fixture", fixture),
            ("seed-oversize", oversize),
            ("seed-unknown-flags", unknown_flags),
            ("seed-short", frame_bytes(&hello, Flags::empty(), 0)[..15].to_vec()),
            ("seed-two-frames", two),
        ]
    }

    /// Seeds for `ring_ops`, one per ring unit test.
    pub fn ring_ops() -> Vec<(&'static str, Vec<u8>)> {
        // Two slots (128 bytes): two small frames, or one of up to 104 bytes.
        let small = |start| Setup { size_log2: 1, max_frame: 0xff, start };
        let mut wrap = Vec::new();
        for i in 0..10 {
            wrap.extend([Op::Send(10 + i), Op::Recv]);
        }
        vec![
            ("seed-send-receive-wrap", encode_ops(small(u32::MAX - 20), &wrap)),
            (
                "seed-backpressure",
                encode_ops(
                    small(0),
                    &[Op::Send(16), Op::Send(16), Op::Send(1), Op::Recv, Op::Send(1), Op::Send(105), Op::Query],
                ),
            ),
            (
                "seed-corrupt-prod",
                encode_ops(small(0), &[Op::SetIndex { which: 0, value: IndexValue::Absolute(65) }, Op::Recv, Op::Recv]),
            ),
            (
                "seed-corrupt-cons",
                encode_ops(
                    small(0),
                    &[
                        Op::Send(0),
                        Op::SetIndex { which: 1, value: IndexValue::Absolute(0x8000_0000) },
                        Op::Query,
                        Op::Send(0),
                    ],
                ),
            ),
            (
                "seed-lying-length",
                encode_ops(small(0), &[Op::Send(4), Op::SetData { offset: 0, value: 100 }, Op::Recv]),
            ),
            (
                // Stamps slot 0 as published (index 0) over zeroed payload.
                "seed-forged-stamp",
                encode_ops(
                    small(0),
                    &(60..64).map(|offset| Op::SetData { offset, value: 0 }).chain([Op::Recv]).collect::<Vec<_>>(),
                ),
            ),
            (
                "seed-oversize-on-receive",
                encode_ops(Setup { size_log2: 2, max_frame: 1, start: 0 }, &[Op::Send(9), Op::Recv, Op::Recv]),
            ),
            ("seed-small-buffer", encode_ops(small(0), &[Op::Send(8), Op::RecvInto(4), Op::RecvInto(8)])),
            (
                "seed-notify",
                encode_ops(
                    Setup { size_log2: 2, max_frame: 8, start: 0 },
                    &[
                        Op::Send(1),
                        Op::RequestData,
                        Op::Send(1),
                        Op::Send(1),
                        Op::Recv,
                        Op::RequestSpace,
                        Op::Recv,
                        Op::Recv,
                    ],
                ),
            ),
        ]
    }
}
