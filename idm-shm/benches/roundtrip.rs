//! Round-trip latency and throughput of the shm transport between two processes.
//!
//! `cargo bench -p idm-shm --bench roundtrip`. The benchmark starts itself a second time
//! as the server (`IDM_SHM_BENCH_ROLE=server`); the client runs in this process. Each
//! process is pinned to its own core (client 0, server 1), so both can spin.
//!
//! Measured:
//! * a bare shared-memory ping-pong (one atomic word in the memfd flipped back and forth),
//!   the floor any protocol over shared memory can reach;
//! * the minimal synchronous call (`Client::call` of a 4-byte message, decoded reply),
//!   polled (both sides spin, never sleep) and blocking (both sides sleep in the futex
//!   on every wait);
//! * one-way throughput of 64 B, 4 KiB and 1 MiB frames through a 4 MiB ring, polled;
//! * copying into and out of the data window (`DataWindow::write`/`read`, which copy with
//!   word-sized atomics), against `memcpy` between private buffers, in one process.
#![deny(unsafe_code)]

use idm_core::wire::{Flags, FrameHeader};
use idm_core::{idm_messages, BulkRef, Client, Message, MessageId, Server, SharedMemory, WaitPolicy};
use idm_shm::{connect, ChannelLayout, ServerLimits, ShmEndpoint, ShmListener};
use serde::{Deserialize, Serialize};
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::{Acquire, Release};
use std::time::{Duration, Instant};

const ROLE: &str = "IDM_SHM_BENCH_ROLE";
const SOCKET: &str = "IDM_SHM_BENCH_SOCKET";
const RING: usize = 4 << 20;
const WINDOW: usize = 64 << 20;
const MAX_FRAME: u32 = (1 << 20) + 64;
const BUF: usize = MAX_FRAME as usize + 64;

const POLLED: WaitPolicy = WaitPolicy { spin_iters: u32::MAX, timeout: None };
const BLOCKING: WaitPolicy = WaitPolicy { spin_iters: 0, timeout: None };

#[derive(Debug, Serialize, Deserialize)]
struct Ping(u32);
impl Message for Ping {
    const ID: MessageId = MessageId(0x0100);
}
#[derive(Debug, Serialize, Deserialize)]
struct Pong(u32);
impl Message for Pong {
    const ID: MessageId = MessageId(0x0101);
}
/// Switch the server's wait policy: 0 = blocking, else polled.
#[derive(Debug, Serialize, Deserialize)]
struct SetPolling(bool);
impl Message for SetPolling {
    const ID: MessageId = MessageId(0x0102);
}
/// Acknowledges a control message.
#[derive(Debug, Serialize, Deserialize)]
struct Ack;
impl Message for Ack {
    const ID: MessageId = MessageId(0x0103);
}
/// Answer, then run `n` bare ping-pong exchanges on window word 0.
#[derive(Debug, Serialize, Deserialize)]
struct BarePingPong(u32);
impl Message for BarePingPong {
    const ID: MessageId = MessageId(0x0104);
}
/// Answer and exit.
#[derive(Debug, Serialize, Deserialize)]
struct Quit;
impl Message for Quit {
    const ID: MessageId = MessageId(0x0105);
}
/// Throughput payload, sent as raw no-reply frames (never decoded).
const BLOB: MessageId = MessageId(0x0110);

idm_messages! { enum Req { Ping(Ping), SetPolling(SetPolling), BarePingPong(BarePingPong), Quit(Quit) } }

fn main() {
    match std::env::var(ROLE).as_deref() {
        Ok("server") => server_main(Path::new(&std::env::var(SOCKET).expect("socket path"))),
        _ => client_main(),
    }
}

fn server_main(path: &Path) {
    pin("server", 1);
    let _ = std::fs::remove_file(path);
    let listener = ShmListener::bind(path, ServerLimits::default()).expect("bind");
    let ShmEndpoint { channel, window, .. } = listener.accept(POLLED).expect("handshake");
    let _ = std::fs::remove_file(path);
    let mut buf = vec![0u8; BUF];
    let mut scratch = vec![0u8; 256];
    let mut server = Server::accept(channel, MAX_FRAME, &mut buf).expect("hello");
    let word = window.memory();
    loop {
        let req = server.recv(&mut buf).expect("server recv");
        if req.id == BLOB {
            continue;
        }
        match Req::decode(req.id, req.body).expect("decodable request") {
            Req::Ping(Ping(n)) => server.reply(&req, &Pong(n), &mut scratch).unwrap(),
            Req::SetPolling(p) => {
                server.reply(&req, &Ack, &mut scratch).unwrap();
                *server.channel_mut().policy_mut() = if p.0 { POLLED } else { BLOCKING };
            }
            Req::BarePingPong(BarePingPong(n)) => {
                server.reply(&req, &Ack, &mut scratch).unwrap();
                for k in 0..n {
                    let want = 2 * k + 1;
                    while word.load_u32(0, Acquire) != want {
                        std::hint::spin_loop();
                    }
                    word.store_u32(0, want + 1, Release);
                }
            }
            Req::Quit(_) => {
                server.reply(&req, &Ack, &mut scratch).unwrap();
                return;
            }
            Req::Unknown(id) => panic!("unknown request {id:?}"),
        }
    }
}

fn client_main() {
    let path: PathBuf = std::env::temp_dir().join(format!("idm-shm-bench-{}.sock", std::process::id()));
    pin("client", 0);
    let mut child = std::process::Command::new(std::env::current_exe().expect("own path"))
        .env(ROLE, "server")
        .env(SOCKET, &path)
        .spawn()
        .expect("spawn the server process");

    let layout = ChannelLayout::new(RING, WINDOW).unwrap();
    let started = Instant::now();
    let ep = loop {
        match connect(&path, layout, POLLED) {
            Ok(ep) => break ep,
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot connect to the server process: {e}"),
        }
    };
    let ShmEndpoint { channel, window, .. } = ep;
    let mut buf = vec![0u8; BUF];
    let mut client = Client::connect(channel, MAX_FRAME, &mut buf).expect("hello");
    println!(
        "idm-shm roundtrip: ring {} KiB, max frame {} B, client on cpu 0, server on cpu 1",
        RING >> 10,
        client.max_frame()
    );
    println!("timer overhead (Instant::now pair): {} ns", timer_overhead());
    println!();

    // Bare ping-pong: one word, two processes.
    let n = 200_000;
    call(&mut client, &BarePingPong(n + 20_000), &mut buf);
    let word = window.memory();
    let mut samples = Vec::with_capacity(n as usize);
    for k in 0..n + 20_000 {
        let t = Instant::now();
        word.store_u32(0, 2 * k + 1, Release);
        while word.load_u32(0, Acquire) != 2 * k + 2 {
            std::hint::spin_loop();
        }
        if k >= 20_000 {
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    report("bare shm ping-pong (atomic word)", &mut samples);

    // Minimal synchronous call, polled then blocking.
    for (name, polling, iters, warm) in [
        ("call round trip, polled", true, 200_000, 20_000),
        ("call round trip, blocking (futex)", false, 20_000, 2_000),
    ] {
        *client.channel_mut().policy_mut() = if polling { POLLED } else { BLOCKING };
        call(&mut client, &SetPolling(polling), &mut buf);
        let mut samples = Vec::with_capacity(iters);
        for i in 0..iters + warm {
            let t = Instant::now();
            let r = client.call(&Ping(i as u32), &mut buf).expect("call");
            let Pong(v) = r.decode().expect("pong");
            black_box(v);
            if i >= warm {
                samples.push(t.elapsed().as_nanos() as u64);
            }
        }
        report(name, &mut samples);
    }
    *client.channel_mut().policy_mut() = POLLED;
    call(&mut client, &SetPolling(true), &mut buf);

    // One-way throughput: no-reply frames, then one call to wait until all are consumed.
    println!();
    for (size, frames) in [(64usize, 2_000_000u64), (4096, 262_144), (1 << 20, 2048)] {
        let body = vec![0x5au8; size];
        let header = FrameHeader { len: size as u32, id: BLOB, flags: Flags::NO_REPLY, seq: 0, aux: 0 };
        for _ in 0..frames / 10 {
            client.channel_mut().send_frame(&header, &body).unwrap();
        }
        call(&mut client, &Ping(0), &mut buf);
        let t = Instant::now();
        for _ in 0..frames {
            client.channel_mut().send_frame(&header, &body).unwrap();
        }
        call(&mut client, &Ping(0), &mut buf);
        let secs = t.elapsed().as_secs_f64();
        println!(
            "throughput {:>8} B frames: {:>9.0} MB/s  {:>12.0} frames/s  ({frames} frames in {:.3} s)",
            size,
            (size as u64 * frames) as f64 / secs / 1e6,
            frames as f64 / secs,
            secs
        );
    }

    // Copies through the data window, one process: the cost a pageable cuMemcpy pays.
    println!();
    let chunk = 16usize << 20;
    let src = vec![0xa5u8; chunk];
    let mut dst = vec![0u8; chunk];
    let desc = BulkRef { offset: 0, len: chunk as u64 };
    let rounds = 32;
    let gbs = |secs: f64| (chunk * rounds) as f64 / secs / 1e9;
    let t = Instant::now();
    for _ in 0..rounds {
        window.write(desc, black_box(&src)).unwrap();
    }
    let w = gbs(t.elapsed().as_secs_f64());
    let t = Instant::now();
    for _ in 0..rounds {
        window.read(desc, black_box(&mut dst)).unwrap();
    }
    let r = gbs(t.elapsed().as_secs_f64());
    let t = Instant::now();
    for _ in 0..rounds {
        black_box(&mut dst).copy_from_slice(black_box(&src));
    }
    let m = gbs(t.elapsed().as_secs_f64());
    println!(
        "data window copy, 16 MiB: write {w:.1} GB/s, read {r:.1} GB/s; memcpy between private buffers {m:.1} GB/s"
    );

    call(&mut client, &Quit, &mut buf);
    drop(client);
    let status = child.wait().expect("wait for the server process");
    assert!(status.success(), "server process failed: {status}");
}

/// A synchronous call whose answer is not measured.
fn call<T: Message>(client: &mut idm_shm::ShmClient, msg: &T, buf: &mut [u8]) {
    let r = client.call(msg, buf).expect("control call");
    assert!(r.header().id == Ack::ID || r.header().id == Pong::ID);
}

fn timer_overhead() -> u64 {
    let mut v: Vec<u64> = (0..10_000)
        .map(|_| {
            let t = Instant::now();
            t.elapsed().as_nanos() as u64
        })
        .collect();
    v.sort_unstable();
    v[v.len() / 2]
}

fn report(name: &str, samples: &mut [u64]) {
    samples.sort_unstable();
    let q = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64;
    println!(
        "{name:<36} n={:<7} min {:>6} ns  p50 {:>6} ns  p99 {:>7} ns  p99.9 {:>7} ns  mean {:>7.0} ns",
        samples.len(),
        samples[0],
        q(0.50),
        q(0.99),
        q(0.999),
        mean
    );
}

fn pin(who: &str, cpu: usize) {
    if let Err(e) = affinity::pin_to_cpu(cpu) {
        eprintln!("warning: could not pin the {who} to cpu {cpu} ({e}); figures will be noisy");
    }
}

#[allow(unsafe_code)]
mod affinity {
    /// Restricts the calling thread (and threads and processes it starts later) to `cpu`.
    pub fn pin_to_cpu(cpu: usize) -> std::io::Result<()> {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `cpu < CPU_SETSIZE` (checked above), so the bit lies inside `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: `set` is a valid cpu_set_t and its size is passed with it.
        let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
