//! Hostile-peer tests: a third thread scribbles random values over ring indices, notify
//! words and frame bytes while a real producer and consumer (then a real client and server)
//! run. Corruption may only ever surface as errors: no panic, no hang, no out-of-bounds
//! frame, and a fatal ring error stays sticky.
//!
//! Every loop is bounded by an iteration count or a wait-policy timeout, and a watchdog
//! aborts the process if a test runs far past its expected time, so a hang fails loudly
//! instead of stalling CI.
//!
//! The scribbler's stores race with the parties' loads, with different access sizes. Rust's
//! memory model leaves racing mixed-size atomics unspecified, which is why these tests are
//! skipped under Miri; on the hardware they model (a peer in another domain writing the
//! same page) such races are ordinary and are exactly what the ring must survive.

mod common;

use common::HeapRegion;
use idm_core::channel::{Channel, ChannelError, Client, Server};
use idm_core::idm_messages;
use idm_core::notify::{Notifier, NotifyError, WaitOutcome, WaitPolicy, WaitToken, Waiter};
use idm_core::region::{RawRegion, SharedMemory, SubRegion};
use idm_core::ring::{capacity, field, footprint, RingConsumer, RingError, RingProducer, SLOT, SLOT_PAYLOAD};
use idm_core::wire::proto::ErrorKind;
use idm_core::wire::{Flags, FrameHeader, Message, MessageId, HEADER_LEN};
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A small deterministic generator (xorshift64*), so each round's scribbles are
/// reproducible from its seed (thread interleavings still vary).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Aborts the process if not dropped within `limit`: a hang becomes a loud failure.
struct Watchdog(#[allow(dead_code)] mpsc::Sender<()>);

impl Watchdog {
    fn arm(what: &'static str, limit: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<()>();
        thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("{what}: still running after {limit:?}, so something hangs; aborting");
                std::process::abort();
            }
        });
        Watchdog(tx)
    }
}

/// Which part of a ring a round corrupts: frames only (headers and bodies, indices
/// intact), indices only (kept close to their real values, so the deeper checks are
/// reached rather than the in-flight bound every time), or anything at all.
#[derive(Clone, Copy, Debug)]
enum Target {
    Frames,
    NearbyIndices,
    Anything,
}

/// Writes one random corruption of `target` into the ring at `mem`.
fn scribble<M: SharedMemory>(mem: &M, size: usize, target: Target, rng: &mut Rng) {
    let slots = (size / SLOT) as u32;
    let what = match target {
        Target::Frames => 7 + rng.below(3),
        Target::NearbyIndices => rng.below(3),
        Target::Anything => rng.below(10),
    };
    match what {
        0 | 1 => {
            let at = if rng.below(2) == 0 { field::PROD } else { field::CONS };
            let near = mem.load_u32(at, Relaxed);
            let delta = rng.below(2 * u64::from(slots) + 1) as u32;
            mem.store_u32(at, near.wrapping_add(delta).wrapping_sub(slots), Release);
        }
        2 => {
            let at = if rng.below(2) == 0 { field::DATA_WANTED } else { field::SPACE_WANTED };
            mem.store_u32(at, rng.next() as u32, Relaxed);
        }
        3 => {
            let at = if rng.below(2) == 0 { field::PROD } else { field::CONS };
            mem.store_u32(at, rng.next() as u32, Release);
        }
        7 => {
            // A stamp near the consumer's index: publishes a stale slot, or unpublishes one.
            let next = mem.load_u32(field::CONS, Relaxed).wrapping_add(rng.below(3) as u32);
            let stamp = next.wrapping_sub(slots * rng.below(2) as u32);
            mem.store_u32(field::DATA + (next % slots) as usize * SLOT + SLOT_PAYLOAD, stamp, Release);
        }
        8 => {
            // The header the consumer reads next.
            let next = mem.load_u32(field::CONS, Relaxed) % slots;
            let off = next as usize * SLOT + rng.below(HEADER_LEN as u64) as usize;
            mem.write_bytes(field::DATA + off, &[rng.next() as u8]);
        }
        _ => {
            let len = 1 + rng.below(8) as usize;
            let off = rng.below((size - len) as u64) as usize;
            let bytes = rng.next().to_le_bytes();
            mem.write_bytes(field::DATA + off, &bytes[..len]);
        }
    }
}

/// Waits a random while between scribbles, so traffic flows in between.
fn pause(rng: &mut Rng) {
    for _ in 0..rng.below(4) {
        thread::yield_now();
    }
    for _ in 0..rng.below(2_000) {
        std::hint::spin_loop();
    }
}

fn frame(seq: u32, len: usize) -> (FrameHeader, Vec<u8>) {
    let header = FrameHeader { len: len as u32, id: MessageId(0x0100), flags: Flags::NO_REPLY, seq, aux: 0 };
    (header, vec![seq as u8; len])
}

/// What one side of a scribbled ring saw.
#[derive(Debug, Default)]
struct SideOutcome {
    frames: u64,
    error: Option<RingError>,
}

/// Checks that `e` is a fatal peer-caused error and that the side now refuses all work.
fn assert_fatal_and_sticky(e: RingError, failure: Option<RingError>, again: Result<(), RingError>) {
    assert!(e.is_fatal(), "only corruption errors are possible here, got {e:?}");
    assert_eq!(failure, Some(e), "a fatal error is recorded");
    assert_eq!(again, Err(e), "and returned by every later call");
}

const RING_ROUNDS: u64 = 60;
const RING_SIDE_ITERS: usize = 20_000;
const RING_SCRIBBLES: usize = 2_000;

#[test]
#[cfg_attr(miri, ignore = "races mixed-size atomics on purpose, and far too slow under Miri")]
fn ring_survives_a_scribbling_peer() {
    let _dog = Watchdog::arm("ring_survives_a_scribbling_peer", Duration::from_secs(60));
    let (mut frames, mut producer_errors, mut consumer_errors) = (0, 0, 0);
    for round in 0..RING_ROUNDS {
        let size = 64usize << (round % 5);
        let max_frame = (capacity(size) - HEADER_LEN) as u32;
        let heap = HeapRegion::new(footprint(size));
        let mem = &heap.region;
        let mut p = RingProducer::init(mem, size).unwrap();
        let mut c = RingConsumer::attach(mem, size, max_frame).unwrap();
        let received = AtomicU32::new(0);
        let (prod, cons) = thread::scope(|s| {
            let producer = s.spawn(|| {
                let mut out = SideOutcome::default();
                for i in 0..RING_SIDE_ITERS {
                    let (h, body) = frame(i as u32, (i * 13) % (max_frame as usize + 1));
                    match p.try_send(&h, &body) {
                        Ok(Some(_)) => out.frames += 1,
                        Ok(None) => thread::yield_now(),
                        Err(e) => {
                            let again = p.free_slots().map(|_| ());
                            assert_fatal_and_sticky(e, p.failure(), again);
                            assert_eq!(p.try_send(&h, &body), Err(e));
                            out.error = Some(e);
                            break;
                        }
                    }
                }
                out
            });
            let consumer = s.spawn(|| {
                let mut out = SideOutcome::default();
                // Exactly max_frame bytes: a larger claimed length must be refused by the
                // ring, never reported as a short buffer or copied past the end.
                let mut buf = vec![0u8; max_frame as usize];
                for _ in 0..RING_SIDE_ITERS {
                    match c.try_recv(&mut buf) {
                        Ok(Some(r)) => {
                            assert!(r.header.len <= max_frame, "{:?}", r.header);
                            out.frames += 1;
                            received.fetch_add(1, Relaxed);
                        }
                        Ok(None) => thread::yield_now(),
                        Err(e) => {
                            let again = c.ready().map(|_| ());
                            assert_fatal_and_sticky(e, c.failure(), again);
                            assert_eq!(c.try_recv(&mut buf), Err(e));
                            out.error = Some(e);
                            break;
                        }
                    }
                }
                out
            });
            let mut rng = Rng::new(round);
            let target = [Target::Frames, Target::NearbyIndices, Target::Anything][round as usize % 3];
            // Let some traffic through first (bounded: the consumer may finish early).
            for _ in 0..100_000 {
                if received.load(Relaxed) >= 8 || consumer.is_finished() {
                    break;
                }
                thread::yield_now();
            }
            for _ in 0..RING_SCRIBBLES {
                if producer.is_finished() && consumer.is_finished() {
                    break;
                }
                scribble(mem, size, target, &mut rng);
                pause(&mut rng);
            }
            (producer.join().unwrap(), consumer.join().unwrap())
        });
        frames += cons.frames;
        producer_errors += u32::from(prod.error.is_some());
        consumer_errors += u32::from(cons.error.is_some());
    }
    // Sanity: the test exercised both healthy traffic and the failure paths.
    assert!(frames > 0, "no frame got through before the scribbling");
    assert!(producer_errors + consumer_errors > 0, "{RING_ROUNDS} rounds of scribbling never failed a ring");
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Add {
    a: u32,
    b: u32,
}
impl Message for Add {
    const ID: MessageId = MessageId(0x0100);
}
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Sum(u32);
impl Message for Sum {
    const ID: MessageId = MessageId(0x0101);
}
idm_messages! { enum Req { Add(Add) } }

/// A doorbell for one direction: notifying bumps a counter, waiting watches it with a
/// deadline, like a futex word. Unlike `Polling` it honours the policy's timeout, so a
/// side whose peer stopped answering gets `TimedOut` instead of spinning forever.
struct Doorbell(AtomicU32);

impl Notifier for Doorbell {
    fn notify(&self) -> Result<(), NotifyError> {
        self.0.fetch_add(1, Release);
        Ok(())
    }
}

impl Waiter for Doorbell {
    fn arm(&self) -> WaitToken {
        WaitToken(self.0.load(Acquire))
    }
    fn wait(&self, token: WaitToken, timeout: Option<Duration>) -> Result<WaitOutcome, NotifyError> {
        let deadline = Instant::now() + timeout.expect("tests always set a timeout");
        while self.0.load(Acquire) == token.0 {
            if Instant::now() >= deadline {
                return Ok(WaitOutcome::TimedOut);
            }
            thread::yield_now();
        }
        Ok(WaitOutcome::Woken)
    }
}

type Mem<'a> = SubRegion<&'a RawRegion>;
type Ch<'a> = Channel<Mem<'a>, &'a Doorbell, &'a Doorbell>;

/// Whether `e` is an error a scribbled channel may legitimately produce, given that this
/// test's messages always fit and its doorbell never fails. A ring error must be fatal
/// and recorded as the channel's sticky failure.
fn acceptable(e: ChannelError, ch: &Ch<'_>) -> bool {
    match e {
        ChannelError::Ring(r) => r.is_fatal() && ch.failure() == Some(r),
        ChannelError::TimedOut
        | ChannelError::UnexpectedFrame { .. }
        | ChannelError::Wire(_)
        | ChannelError::Remote { .. } => true,
        _ => false,
    }
}

const CHANNEL_ROUNDS: u64 = 18;
const CALLS: u32 = 2_000;
const HEALTHY_CALLS: u32 = 5;
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(10);
/// Only a dead or lying peer makes a side wait this long once scribbling may have begun.
const HOSTILE_TIMEOUT: Duration = Duration::from_millis(50);
const CHANNEL_SCRIBBLES: usize = 3_000;

#[test]
#[cfg_attr(miri, ignore = "races mixed-size atomics on purpose, and far too slow under Miri")]
fn channel_survives_a_scribbling_peer() {
    let _dog = Watchdog::arm("channel_survives_a_scribbling_peer", Duration::from_secs(60));
    for round in 0..CHANNEL_ROUNDS {
        let size = 128usize << (round / 3 % 3);
        let heap = HeapRegion::new(2 * footprint(size));
        let to_server = SubRegion::new(&heap.region, 0, footprint(size)).unwrap();
        let to_client = SubRegion::new(&heap.region, footprint(size), footprint(size)).unwrap();
        let (client_bell, server_bell) = (Doorbell(AtomicU32::new(0)), Doorbell(AtomicU32::new(0)));
        let policy = WaitPolicy {
            spin_iters: 100,
            // Generous for the hello and the healthy calls, which must succeed however
            // loaded the machine; each side shortens it once scribbling may start.
            timeout: Some(HEALTHY_TIMEOUT),
        };
        let client_ch: Ch<'_> = Channel::new(
            RingProducer::init(to_server, size).unwrap(),
            RingConsumer::attach(to_client, size, 0).unwrap(),
            &server_bell,
            &client_bell,
            policy,
        );
        let server_ch: Ch<'_> = Channel::new(
            RingProducer::init(to_client, size).unwrap(),
            RingConsumer::attach(to_server, size, 0).unwrap(),
            &client_bell,
            &server_bell,
            policy,
        );
        let healthy = AtomicU32::new(0);
        let client_done = AtomicBool::new(false);
        let server_done = AtomicBool::new(false);
        let server_index = AtomicU32::new(0);

        thread::scope(|s| {
            let server = s.spawn(|| {
                let r = serve(server_ch, &server_index);
                server_done.store(true, Release);
                r
            });
            let client = s.spawn(|| {
                let r = run_client(client_ch, &healthy);
                client_done.store(true, Release);
                r
            });

            let mut rng = Rng::new(0x5eed + round);
            let target = [Target::Frames, Target::NearbyIndices, Target::Anything][round as usize % 3];
            while healthy.load(Acquire) < HEALTHY_CALLS && !client_done.load(Acquire) {
                thread::yield_now();
            }
            for _ in 0..CHANNEL_SCRIBBLES {
                if client_done.load(Acquire) {
                    break;
                }
                let mem = if rng.below(2) == 0 { &to_server } else { &to_client };
                scribble(mem, size, target, &mut rng);
                pause(&mut rng);
            }
            // Poison the request ring once the client is gone, so the server's receive
            // loop must end: every payload byte 0xff (unknown flag bits in any header), and
            // the slot where the server looks next stamped as published.
            while !client_done.load(Acquire) {
                thread::yield_now();
            }
            let slots = (size / SLOT) as u32;
            for _ in 0..1_000_000u32 {
                if server_done.load(Acquire) {
                    break;
                }
                let next = server_index.load(Acquire);
                let slot = field::DATA + (next % slots) as usize * SLOT;
                to_server.write_bytes(slot, &[0xff; SLOT_PAYLOAD]);
                to_server.store_u32(slot + SLOT_PAYLOAD, next, Release);
                thread::yield_now();
            }

            let client_result = client.join().unwrap();
            let server_result = server.join().unwrap();
            assert!(client_result.healthy_ok, "calls before the scribbling must succeed: {client_result:?}");
            assert!(server_result.is_err(), "the server's loop must end with an error, got {server_result:?}");
        });
    }
}

#[derive(Debug)]
struct ClientOutcome {
    healthy_ok: bool,
    calls: u32,
    error: Option<ChannelError>,
}

fn run_client(ch: Ch<'_>, healthy: &AtomicU32) -> ClientOutcome {
    let mut buf = [0u8; 2048];
    let mut out = ClientOutcome { healthy_ok: false, calls: 0, error: None };
    let mut client = match Client::connect(ch, 1024, &mut buf) {
        Ok(c) => c,
        Err(e) => {
            out.error = Some(e);
            return out;
        }
    };
    for i in 0..CALLS {
        if i % 3 == 0 {
            if let Err(e) = client.post(&Add { a: i, b: 0 }, &mut buf) {
                assert!(acceptable(e, client.channel_mut()), "client post: {e:?}");
                out.error = Some(e);
                return out;
            }
        }
        let sum = client.call(&Add { a: i, b: 1 }, &mut buf).and_then(|reply| reply.decode::<Sum>());
        match sum {
            Ok(Sum(n)) => {
                out.calls += 1;
                if i < HEALTHY_CALLS {
                    // Nothing scribbles until these calls are done.
                    assert_eq!(n, i + 1);
                    if i + 1 == HEALTHY_CALLS {
                        out.healthy_ok = true;
                        client.channel_mut().policy_mut().timeout = Some(HOSTILE_TIMEOUT);
                    }
                    healthy.fetch_add(1, Release);
                }
            }
            Err(e) => {
                // A scribbled reply can fail a call without failing the rings; the owner
                // tears the connection down either way, and so do we.
                assert!(acceptable(e, client.channel_mut()), "client call: {e:?}");
                out.error = Some(e);
                return out;
            }
        }
    }
    out
}

/// Serves requests with a bounded, non-blocking receive loop until the channel fails,
/// publishing the index it will receive at next into `index` (for the poisoning).
fn serve(ch: Ch<'_>, index: &AtomicU32) -> Result<u64, ChannelError> {
    let mut buf = [0u8; 2048];
    let mut scratch = [0u8; 2048];
    let mut server = Server::accept(ch, 1024, &mut buf)?;
    server.channel_mut().policy_mut().timeout = Some(HOSTILE_TIMEOUT);
    let mut served = 0u64;
    for _ in 0..20_000_000u64 {
        index.store(server.channel_mut().rx_index(), Release);
        let result = match server.try_recv(&mut buf) {
            Ok(Some(req)) => {
                served += 1;
                assert!(req.body.len() <= server.max_frame() as usize);
                match Req::decode(req.id, req.body) {
                    Ok(Req::Add(Add { a, b })) => server.reply(&req, &Sum(a.wrapping_add(b)), &mut scratch),
                    Ok(Req::Unknown(_)) => server.reply_error(&req, ErrorKind::UnknownMessage, 1, &mut scratch),
                    Err(_) => server.reply_error(&req, ErrorKind::BadBody, 2, &mut scratch),
                }
            }
            Ok(None) => {
                thread::yield_now();
                Ok(())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            let ch = server.channel_mut();
            assert!(
                matches!(e, ChannelError::Ring(r) if r.is_fatal() && ch.failure() == Some(r))
                    || matches!(e, ChannelError::TimedOut | ChannelError::UnexpectedFrame { .. }),
                "server: {e:?}"
            );
            return Err(e);
        }
    }
    Ok(served)
}
