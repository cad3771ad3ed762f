//! Loom models of the ring: every interleaving (and every weak-memory outcome loom can
//! produce) of a producer and a consumer thread delivers frames intact and in order, and
//! the notify-request handshake never loses a wake-up.
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom" cargo test -p idm-core --release --test loom_ring --target-dir target/loom`
//!
//! The ring reaches memory only through [`SharedMemory`], so the model swaps in
//! [`LoomMemory`], an array of loom atomics, and runs the real ring code on it.
//!
//! **SeqCst.** Loom does not model `SeqCst` loads and stores (it treats them as
//! acquire/release), only `SeqCst` fences; see tokio-rs/loom#180. `LoomMemory` therefore
//! issues a `SeqCst` fence before every `SeqCst` load. That keeps the guarantee the
//! language gives a `SeqCst` store followed by a `SeqCst` load (they cannot be reordered,
//! which is what the notify handshake relies on) while still letting loom catch a
//! handshake whose re-check is only an acquire load.
#![cfg(loom)]

use idm_core::region::SharedMemory;
use idm_core::ring::{capacity, footprint, RingConsumer, RingProducer};
use idm_core::wire::{Flags, FrameHeader, MessageId, HEADER_LEN};
use loom::sync::atomic::{fence, AtomicU32};
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::Ordering::{self, Relaxed, SeqCst};

/// Shared memory made of loom atomics, one per 32-bit word. Byte copies go word by word
/// with relaxed accesses, as `RawRegion` does; a partial word is read, patched and
/// written back, which is safe because only one side ever writes a given data byte.
struct LoomMemory {
    words: Vec<AtomicU32>,
}

impl LoomMemory {
    fn new(bytes: usize) -> Self {
        LoomMemory { words: (0..bytes.div_ceil(4)).map(|_| AtomicU32::new(0)).collect() }
    }
}

impl SharedMemory for LoomMemory {
    fn size(&self) -> usize {
        self.words.len() * 4
    }

    fn load_u32(&self, offset: usize, order: Ordering) -> u32 {
        assert_eq!(offset % 4, 0);
        if order == SeqCst {
            fence(SeqCst);
        }
        self.words[offset / 4].load(order)
    }

    fn store_u32(&self, offset: usize, value: u32, order: Ordering) {
        assert_eq!(offset % 4, 0);
        self.words[offset / 4].store(value, order);
    }

    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        let mut i = 0;
        while i < dst.len() {
            let pos = offset + i;
            let start = pos % 4;
            let n = (4 - start).min(dst.len() - i);
            let word = self.words[pos / 4].load(Relaxed).to_ne_bytes();
            dst[i..i + n].copy_from_slice(&word[start..start + n]);
            i += n;
        }
    }

    fn write_bytes(&self, offset: usize, src: &[u8]) {
        let mut i = 0;
        while i < src.len() {
            let pos = offset + i;
            let start = pos % 4;
            let n = (4 - start).min(src.len() - i);
            let cell = &self.words[pos / 4];
            let mut word = if n == 4 { [0; 4] } else { cell.load(Relaxed).to_ne_bytes() };
            word[start..start + n].copy_from_slice(&src[i..i + n]);
            cell.store(u32::from_ne_bytes(word), Relaxed);
            i += n;
        }
    }
}

/// Two slots of 60 payload bytes: room for two small frames, or one of up to 104 bytes.
const SIZE: usize = 128;
const CAPACITY: usize = capacity(SIZE);

fn frame(seq: u32, len: usize) -> (FrameHeader, Vec<u8>) {
    let header = FrameHeader { len: len as u32, id: MessageId(0x0100), flags: Flags::empty(), seq, aux: 0 };
    let body = (0..len).map(|i| ((seq as u8) << 4) | i as u8).collect();
    (header, body)
}

/// Explores the model exhaustively: the models are small enough that the whole search
/// takes well under a second.
fn model(f: impl Fn() + Sync + Send + 'static) {
    model_bounded(None, f);
}

/// Explores the model with at most `preemptions` preemptions per execution (most
/// concurrency bugs need only a few), for models too large to search exhaustively.
/// `LOOM_MAX_PREEMPTIONS` overrides the bound.
fn model_bounded(preemptions: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = preemptions;
    }
    builder.check(f);
}

/// Sends `lens.len()` frames from one thread and receives them on another, starting at
/// index `start`; the consumer checks each frame.
fn deliver(start: u32, lens: &'static [usize], preemptions: Option<usize>) {
    model_bounded(preemptions, move || {
        let mem = Arc::new(LoomMemory::new(footprint(SIZE)));
        drop(RingProducer::init_at(&*mem, SIZE, start).unwrap());

        let m = mem.clone();
        let producer = thread::spawn(move || {
            let mut p = RingProducer::attach(&*m, SIZE).unwrap();
            for (seq, &len) in lens.iter().enumerate() {
                let (h, body) = frame(seq as u32, len);
                while p.try_send(&h, &body).unwrap().is_none() {
                    thread::yield_now();
                }
            }
        });

        let mut c = RingConsumer::attach(&*mem, SIZE, (CAPACITY - HEADER_LEN) as u32).unwrap();
        let mut buf = [0u8; CAPACITY];
        for (seq, &len) in lens.iter().enumerate() {
            let r = loop {
                match c.try_recv(&mut buf).unwrap() {
                    Some(r) => break r,
                    None => thread::yield_now(),
                }
            };
            let (h, body) = frame(seq as u32, len);
            assert_eq!(r.header, h, "frames arrive in order");
            assert_eq!(&buf[..len], &body[..], "frame {seq} arrives intact");
        }
        producer.join().unwrap();
    });
}

/// Two frames that fit at once, no wrap.
#[test]
fn two_frames_arrive_in_order() {
    deliver(0, &[8, 4], None);
}

/// Three one-slot frames in a two-slot ring: the producer must wait for space, the ring
/// wraps, and so do the u32 indices during the run.
#[test]
fn backpressure_and_wraparound_keep_frames_intact() {
    deliver(u32::MAX - 1, &[12, 12, 12], None);
}

/// A longer run mixing sizes: empty bodies, frames of two slots (one of them the whole
/// ring, published by its first stamp after its second), and several rounds of waiting for
/// space. Too large for an exhaustive search.
#[test]
fn mixed_sizes_under_backpressure() {
    deliver(u32::MAX - 2, &[0, 50, 104, 4, 0], Some(4));
}

/// Odd lengths: bodies end mid-word, so the byte copies take the partial-word paths.
#[test]
fn unaligned_frames_arrive_intact() {
    deliver(u32::MAX - 2, &[3, 5], None);
}

/// The consumer asks for a notification, then re-checks for data; the producer publishes a
/// frame, then checks whether one was asked for. If the consumer's re-check found nothing,
/// the producer must have seen the request: otherwise the consumer sleeps on a frame that
/// has arrived (a lost wake-up).
#[test]
fn data_notify_request_is_never_lost() {
    model(|| {
        let mem = Arc::new(LoomMemory::new(footprint(SIZE)));
        drop(RingProducer::init(&*mem, SIZE).unwrap());
        let m = mem.clone();
        let producer = thread::spawn(move || {
            let mut p = RingProducer::attach(&*m, SIZE).unwrap();
            let (h, body) = frame(0, 4);
            p.try_send(&h, &body).unwrap().unwrap().notify
        });
        let mut c = RingConsumer::attach(&*mem, SIZE, 32).unwrap();
        c.request_data_notify();
        let seen = c.ready().unwrap();
        let notified = producer.join().unwrap();
        assert!(
            seen || notified,
            "lost wake-up: the consumer found the ring empty after asking to be notified, \
             and the producer did not notify"
        );
    });
}

/// The mirror image: the producer finds the ring full, asks for a notification, re-checks
/// the free space; the consumer frees space, then checks whether one was asked for.
#[test]
fn space_notify_request_is_never_lost() {
    model(|| {
        let mem = Arc::new(LoomMemory::new(footprint(SIZE)));
        drop(RingProducer::init(&*mem, SIZE).unwrap());
        let m = mem.clone();
        let producer = thread::spawn(move || {
            let mut p = RingProducer::attach(&*m, SIZE).unwrap();
            // One frame fills the whole ring.
            let (h, body) = frame(0, CAPACITY - HEADER_LEN);
            assert!(p.try_send(&h, &body).unwrap().is_some());
            let (h, body) = frame(1, 0);
            if p.try_send(&h, &body).unwrap().is_some() {
                return None; // The consumer was quick: no need to wait.
            }
            p.request_space_notify();
            Some(p.free_slots().unwrap() >= 1)
        });
        let mut c = RingConsumer::attach(&*mem, SIZE, CAPACITY as u32).unwrap();
        let mut buf = [0u8; CAPACITY];
        let r = loop {
            match c.try_recv(&mut buf).unwrap() {
                Some(r) => break r,
                None => thread::yield_now(),
            }
        };
        if let Some(saw_space) = producer.join().unwrap() {
            assert!(
                saw_space || r.notify,
                "lost wake-up: the producer found no space after asking to be notified, \
                 and the consumer did not notify"
            );
        }
    });
}
