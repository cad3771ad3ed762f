//! Property tests for the ring: random ring sizes, random frame sizes, random interleavings
//! of sends and receives, and indices that start anywhere (near `u32::MAX` included). Every
//! frame must arrive intact and in order, a full ring must push back instead of dropping,
//! and local errors must leave the ring usable.

mod common;

use common::{proptest_config, HeapRegion};
use idm_core::region::{SharedMemory, SubRegion};
use idm_core::ring::{capacity, footprint, frame_slots, RingConsumer, RingError, RingProducer, SLOT};
use idm_core::wire::{Flags, FrameHeader, MessageId, HEADER_LEN};
use proptest::prelude::*;
use std::collections::VecDeque;

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Send a frame whose body length is this value modulo the largest body the ring holds.
    Send(u16),
    /// Receive into a buffer large enough for any frame.
    Recv,
    /// Receive into a buffer of this many bytes (modulo the largest body), which may be too
    /// small for the next frame.
    RecvInto(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u16>().prop_map(Op::Send),
        3 => Just(Op::Recv),
        1 => any::<u16>().prop_map(Op::RecvInto),
    ]
}

/// Where both indices start: zero, just below the u32 wrap, or anywhere.
fn start_index() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), (u32::MAX - 8192..=u32::MAX), any::<u32>(),]
}

/// The body of frame `seq`: its length and a pattern that differs per frame and per byte.
fn body(seq: u32, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i * 7) as u8).collect()
}

fn header(seq: u32, len: usize) -> FrameHeader {
    FrameHeader {
        len: len as u32,
        id: MessageId(0x0100 + (seq % 7) as u16),
        flags: Flags::NO_REPLY,
        seq,
        aux: seq.wrapping_mul(0x9e37_79b9),
    }
}

/// Receives the frame at the front of the model and checks it is intact.
fn expect_frame<M: SharedMemory>(
    c: &mut RingConsumer<M>,
    model: &mut VecDeque<(u32, usize)>,
    used: &mut usize,
    buf: &mut [u8],
) {
    let r = c.try_recv(buf).unwrap().expect("model says a frame is waiting");
    let (seq, len) = model.pop_front().unwrap();
    assert_eq!(r.header, header(seq, len), "frames arrive in order");
    assert_eq!(&buf[..len], &body(seq, len)[..], "frame {seq} intact");
    *used -= frame_slots(len);
}

/// Runs `ops` against a ring and a model (a queue of frames; `used` counts slots), then
/// drains the ring.
fn run_ops(size_log2: u32, base_words: usize, start: u32, ops: &[Op]) {
    let size = 1usize << size_log2;
    let slots = size / SLOT;
    let max_body = capacity(size) - HEADER_LEN;
    let base = base_words * 8;
    let heap = HeapRegion::new(base + footprint(size));
    let mem = SubRegion::new(&heap.region, base, footprint(size)).unwrap();
    let mut p = RingProducer::init_at(mem, size, start).unwrap();
    let mut c = RingConsumer::attach(mem, size, max_body as u32).unwrap();

    let mut model: VecDeque<(u32, usize)> = VecDeque::new();
    let mut used = 0usize;
    let mut next_seq = 0u32;
    let mut buf = vec![0u8; max_body];

    for &op in ops {
        match op {
            Op::Send(n) => {
                let len = n as usize % (max_body + 1);
                let need = frame_slots(len);
                let sent = p.try_send(&header(next_seq, len), &body(next_seq, len)).unwrap();
                if used + need <= slots {
                    assert!(sent.is_some(), "room for {need} slots, {used} in use");
                    model.push_back((next_seq, len));
                    used += need;
                    next_seq += 1;
                } else {
                    assert_eq!(sent, None, "a full ring pushes back, never overwrites");
                }
                assert_eq!(p.free_slots().unwrap(), slots - used);
            }
            Op::Recv => {
                if model.is_empty() {
                    assert_eq!(c.try_recv(&mut buf).unwrap(), None);
                } else {
                    expect_frame(&mut c, &mut model, &mut used, &mut buf);
                }
            }
            Op::RecvInto(n) => {
                let n = n as usize % (max_body + 1);
                match model.front() {
                    None => assert_eq!(c.try_recv(&mut buf[..n]).unwrap(), None),
                    Some(&(_, len)) if len > n => {
                        // A local error: nothing consumed, the ring stays usable.
                        assert_eq!(c.try_recv(&mut buf[..n]), Err(RingError::BufferTooSmall { need: len }));
                        assert_eq!(c.failure(), None);
                    }
                    Some(_) => expect_frame(&mut c, &mut model, &mut used, &mut buf[..n]),
                }
            }
        }
        assert_eq!(c.ready().unwrap(), used > 0, "published exactly when the model holds a frame");
    }
    while !model.is_empty() {
        expect_frame(&mut c, &mut model, &mut used, &mut buf);
    }
    assert_eq!(c.try_recv(&mut buf).unwrap(), None);
    assert_eq!(p.free_slots().unwrap(), slots);
    assert_eq!((p.failure(), c.failure()), (None, None));
}

proptest! {
    #![proptest_config(proptest_config(256))]

    #[test]
    fn interleaved_sends_and_receives_deliver_everything_in_order(
        // Under Miri, smaller rings (and fewer ops) keep the run to seconds.
        size_log2 in 6u32..=if cfg!(miri) { 8 } else { 12 },
        base_words in 0usize..4,
        start in start_index(),
        ops in proptest::collection::vec(op(), 1..if cfg!(miri) { 24 } else { 300 }),
    ) {
        run_ops(size_log2, base_words, start, &ops);
    }

    #[test]
    fn oversize_frames_are_a_local_error(size_log2 in 6u32..=10, extra in 1usize..64) {
        let size = 1usize << size_log2;
        let heap = HeapRegion::new(footprint(size));
        let mut p = RingProducer::init(&heap.region, size).unwrap();
        let len = capacity(size) - HEADER_LEN + extra;
        prop_assert_eq!(
            p.try_send(&header(0, len), &body(0, len)),
            Err(RingError::FrameTooLarge { len: HEADER_LEN + len, size: capacity(size) })
        );
        prop_assert_eq!(p.failure(), None);
        prop_assert!(p.try_send(&header(0, 1), &[0]).unwrap().is_some());
    }
}

proptest! {
    // Threads under Miri are slow; a couple of cases still exercise the synchronisation.
    #![proptest_config(proptest_config(24))]

    /// A producer and a consumer on two threads, each spinning only while the ring is full
    /// or empty: every frame arrives intact and in order.
    #[test]
    fn concurrent_producer_and_consumer_lose_nothing(
        size_log2 in 6u32..=9,
        start in start_index(),
        lens in proptest::collection::vec(0usize..=1000, 1..if cfg!(miri) { 12 } else { 400 }),
    ) {
        let size = 1usize << size_log2;
        let max_body = capacity(size) - HEADER_LEN;
        let lens: Vec<usize> = lens.into_iter().map(|l| l % (max_body + 1)).collect();
        let heap = HeapRegion::new(footprint(size));
        let mut p = RingProducer::init_at(&heap.region, size, start).unwrap();
        let mut c = RingConsumer::attach(&heap.region, size, max_body as u32).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                for (seq, &len) in lens.iter().enumerate() {
                    let seq = seq as u32;
                    while p.try_send(&header(seq, len), &body(seq, len)).unwrap().is_none() {
                        std::thread::yield_now();
                    }
                }
            });
            let mut buf = vec![0u8; max_body];
            for (seq, &len) in lens.iter().enumerate() {
                let seq = seq as u32;
                let r = loop {
                    match c.try_recv(&mut buf).unwrap() {
                        Some(r) => break r,
                        None => std::thread::yield_now(),
                    }
                };
                assert_eq!(r.header, header(seq, len));
                assert_eq!(&buf[..len], &body(seq, len)[..]);
            }
        });
        prop_assert_eq!(c.try_recv(&mut [0u8; 0]).unwrap(), None);
    }
}
