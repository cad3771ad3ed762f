//! Soak test: the real daemon (simulated GPU) under mixed load from many zones for a bounded
//! time, while a chaos thread kills client processes at random points, a hostile client
//! writes truncated and scribbled frames into its rings, and a flood of sessions comes and
//! goes (past the zone's `max_sessions`, and half-finished handshakes).
//!
//! ```text
//!   test process (the hub)                       client processes (this binary, a role)
//!   ----------------------                       --------------------------------------
//!   daemon ── admin report, VmRSS                steady zones: alloc / copy / launch / memset /
//!   hub: relays IPC tokens between the two       copy DtoD / free, every byte checked against
//!        zones of each sharing group             a host-side copy; CUDA IPC with their pair
//!   chaos thread: SIGKILLs victim clients,       victim zones: the same load, without IPC,
//!        waits for their zone to empty           until killed
//!   hostile thread: bad frames, scribbles
//!   flood thread: sessions on and off
//! ```
//!
//! As root every client runs under its own uid, so each is a zone of its own (zones are
//! told apart by `SO_PEERCRED`); otherwise all of them are sessions of the test's one zone
//! and the per-zone accounting checks become per-session ones.
//!
//! Asserted: every steady zone ends with all its data verified and (with zones of their
//! own) its accounting exact throughout; every killed client's session leaves the report
//! (as root, its whole zone: memory back to zero); every hostile session that wrote a
//! frame the host must refuse is failed; all sessions are gone at the end; the daemon's
//! resident memory grew by less than `RSS_GROWTH`; the daemon still serves.
//!
//! `VGPU_SOAK_SECS` (default 20) is how long the load runs, `VGPU_SOAK_ZONES` (default 16)
//! how many client zones, `VGPU_SOAK_SEED` the seed (printed at the start; random choices
//! repeat with it, their timing does not), `VGPU_SOAK_LOG` the daemon's `VGPU_LOG` (default
//! `error`), `VGPU_SOAK_ONE_UID=1` forces the one-zone mode. Every wait is bounded.

mod common;

use common::*;
use idm_core::ring::{field, SLOT, SLOT_PAYLOAD};
use idm_core::wire::proto::ErrorKind;
use idm_core::{ChannelError, Message, MessageId, SharedMemory};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};
use vgpu_proto::generated::*;
use vgpu_proto::*;

/// Each client zone's memory quota.
const ZONE_QUOTA: u64 = 8 << 20;
/// What a client holds at most (the rest of its quota is room for an IPC export).
const CLIENT_BUDGET: u64 = 6 << 20;
/// Allocations a client holds at most.
const MAX_BLOCKS: usize = 24;
/// The largest allocation (copies of it fit the window below `load_module`'s image). Small:
/// the soak is about many requests, not bandwidth.
const MAX_BLOCK: u64 = 64 << 10;
/// The size of each IPC export.
const IPC_BYTES: usize = 32 << 10;
/// How much the daemon's resident memory may grow over the soak.
const RSS_GROWTH: u64 = 64 << 20;
/// First uid of the client zones (as root).
const BASE_UID: u32 = 47000;
/// Victim zones (killed by the chaos thread); the others are steady.
const VICTIMS: usize = 4;
/// `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`.
const LAZY: u32 = 1;
/// The longest any one wait of the soak may take before it counts as a hang (the machine
/// may be slow and crowded: this is a hang guard, not a timing assertion).
const GUARD: Duration = Duration::from_secs(120);

/// xorshift64*: a small deterministic generator (no crate needed).
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // splitmix64 once, so that nearby seeds give unrelated streams (and never 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }

    /// Random bytes, fewer than `max` of them.
    fn junk(&mut self, max: u64) -> Vec<u8> {
        let len = self.below(max) as usize;
        self.bytes(len)
    }

    /// A non-empty sub-range `(start, len)` of `0..len`.
    fn span(&mut self, len: u64) -> (u64, u64) {
        let start = self.below(len);
        (start, 1 + self.below(len - start))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

/// The bytes an exporter writes for IPC round `round` of the pair with seed `pair`: both
/// zones of the pair compute them.
fn ipc_data(pair: u64, round: u64) -> Vec<u8> {
    Rng::new(pair ^ round.wrapping_mul(0x1000_0000_01b3)).bytes(IPC_BYTES)
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

// ---- the client role ----

/// What a client process does (from `VGPU_SOAK_ROLE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Load for `VGPU_SOAK_SECS`, then verify, free and report.
    Steady,
    /// Steady, and every so often exports an allocation to its pair.
    Exporter,
    /// Steady, and opens what its pair exports.
    Importer,
    /// Load until killed.
    Victim,
}

/// One allocation and what it must hold.
struct Block {
    dptr: u64,
    data: Vec<u8>,
}

/// A client process's session and the host-side copy of everything it wrote.
struct Client {
    g: Guest,
    role: Role,
    rng: Rng,
    fill: Handle,
    stream: Handle,
    blocks: Vec<Block>,
    /// The zone's memory quota when the zone is this session's alone (0: shared).
    quota: u64,
    pair: u64,
    inbox: Receiver<String>,
    /// The hub said `END`: the pair exports no more.
    ended: bool,
    ops: u64,
    verified: u64,
    launches: u64,
    ipc: u64,
    out_of_memory: u64,
}

/// Says what went wrong on the hub's channel and ends the client.
fn fail(msg: &str) -> ! {
    println!("SOAK FAILED {msg}");
    std::io::stdout().flush().unwrap();
    std::process::exit(1)
}

fn ok<T>(r: Result<T, u32>, what: &str) -> T {
    r.unwrap_or_else(|code| fail(&format!("{what}: CUDA error {code}")))
}

impl Client {
    fn held(&self) -> u64 {
        self.blocks.iter().map(|b| b.data.len() as u64).sum()
    }

    fn pick(&mut self) -> usize {
        self.rng.below(self.blocks.len() as u64) as usize
    }

    /// One random operation, its result checked.
    fn step(&mut self) {
        self.ops += 1;
        let op = self.rng.below(100);
        if self.blocks.is_empty() || (op < 20 && self.blocks.len() < MAX_BLOCKS) {
            return self.alloc();
        }
        match op {
            0..=19 | 90..=99 => self.free(),
            20..=39 => self.write(),
            40..=59 => self.verify(),
            60..=71 => self.launch(),
            72..=79 => self.memset(),
            80..=87 => self.copy_dtod(),
            _ => self.check_accounting(),
        }
    }

    fn alloc(&mut self) {
        let size = 256 * (1 + self.rng.below(MAX_BLOCK / 256));
        if self.held() + size > CLIENT_BUDGET {
            return self.free();
        }
        let dptr = match self.g.alloc(size) {
            Ok(p) => p,
            // Sessions that share one zone can run it out of memory together.
            Err(code::OUT_OF_MEMORY) if self.quota == 0 => {
                self.out_of_memory += 1;
                return;
            }
            Err(code) => fail(&format!("alloc of {size} bytes: CUDA error {code}")),
        };
        // Fresh memory holds whatever it holds: write it whole before any check.
        let data = self.rng.bytes(size as usize);
        ok(self.g.write(dptr, &data), "initial write");
        self.blocks.push(Block { dptr, data });
    }

    fn free(&mut self) {
        if self.blocks.is_empty() {
            return;
        }
        let i = self.pick();
        self.verify_block(i, 0, self.blocks[i].data.len());
        let b = self.blocks.swap_remove(i);
        ok(self.g.done(&CuMemFreeV2 { dptr: b.dptr }), "free");
    }

    fn write(&mut self) {
        let i = self.pick();
        let (off, len) = self.rng.span(self.blocks[i].data.len() as u64);
        let bytes = self.rng.bytes(len as usize);
        ok(self.g.write(self.blocks[i].dptr + off, &bytes), "write");
        self.blocks[i].data[off as usize..(off + len) as usize].copy_from_slice(&bytes);
    }

    fn verify(&mut self) {
        let i = self.pick();
        let (off, len) = self.rng.span(self.blocks[i].data.len() as u64);
        self.verify_block(i, off as usize, len as usize);
    }

    fn verify_block(&mut self, i: usize, off: usize, len: usize) {
        let got = ok(self.g.read(self.blocks[i].dptr + off as u64, len), "read");
        let want = &self.blocks[i].data[off..off + len];
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            fail(&format!(
                "block {:#x}: byte {} of a {len}-byte read is {:#04x}, not {:#04x}",
                self.blocks[i].dptr,
                off + at,
                got[at],
                want[at]
            ));
        }
        self.verified += len as u64;
    }

    /// `fill_u32` over a word range of a block, on the client's own stream.
    fn launch(&mut self) {
        let i = self.pick();
        let words = self.blocks[i].data.len() as u64 / 4;
        let (first, n) = self.rng.span(words);
        let v = self.rng.next() as u32;
        let mut params = (self.blocks[i].dptr + first * 4).to_le_bytes().to_vec();
        params.extend_from_slice(&v.to_le_bytes());
        params.extend_from_slice(&[0; 4]);
        params.extend_from_slice(&n.to_le_bytes());
        let grid = n.div_ceil(256) as u32;
        let config = LaunchConfig { grid: [grid, 1, 1], block: [256, 1, 1], shared_mem_bytes: 0, attrs: Vec::new() };
        ok(self.g.done(&Launch { func: self.fill, config, stream: self.stream, params }), "launch");
        ok(self.g.done(&CuStreamSynchronize { h_stream: self.stream }), "stream synchronize");
        for w in self.blocks[i].data[(first * 4) as usize..((first + n) * 4) as usize].chunks_exact_mut(4) {
            w.copy_from_slice(&v.to_le_bytes());
        }
        self.launches += 1;
    }

    fn memset(&mut self) {
        let i = self.pick();
        let (off, len) = self.rng.span(self.blocks[i].data.len() as u64);
        let uc = self.rng.next() as u8;
        ok(self.g.done(&CuMemsetD8V2 { dst_device: self.blocks[i].dptr + off, uc, n: len }), "memset");
        self.blocks[i].data[off as usize..(off + len) as usize].fill(uc);
    }

    fn copy_dtod(&mut self) {
        if self.blocks.len() < 2 {
            return self.write();
        }
        let (a, b) = (self.pick(), self.pick());
        if a == b {
            return self.verify();
        }
        let most = self.blocks[a].data.len().min(self.blocks[b].data.len()) as u64;
        let len = 1 + self.rng.below(most);
        let from = self.rng.below(self.blocks[a].data.len() as u64 - len + 1);
        let to = self.rng.below(self.blocks[b].data.len() as u64 - len + 1);
        let req = CuMemcpyDtoDV2 {
            dst_device: self.blocks[b].dptr + to,
            src_device: self.blocks[a].dptr + from,
            byte_count: len,
        };
        ok(self.g.done(&req), "device-to-device copy");
        let src = self.blocks[a].data[from as usize..(from + len) as usize].to_vec();
        self.blocks[b].data[to as usize..(to + len) as usize].copy_from_slice(&src);
    }

    /// With a zone of its own, `cuMemGetInfo` is exactly the quota less what it holds.
    fn check_accounting(&mut self) {
        if self.quota == 0 {
            return self.verify();
        }
        let free = ok(self.g.call::<_, CuMemGetInfoV2Reply>(&CuMemGetInfoV2 {}), "mem get info").free;
        if free != self.quota - self.held() {
            fail(&format!("the zone reports {free} bytes free, holding {} of {}", self.held(), self.quota));
        }
    }

    /// An exporter's IPC round: export, let the pair read and overwrite it, check that.
    fn export_round(&mut self, round: u64) {
        let data = ipc_data(self.pair, round);
        let dptr = match self.g.alloc(IPC_BYTES as u64) {
            Ok(p) => p,
            Err(code::OUT_OF_MEMORY) if self.quota == 0 => {
                self.out_of_memory += 1;
                return;
            }
            Err(code) => fail(&format!("IPC alloc: CUDA error {code}")),
        };
        ok(self.g.write(dptr, &data), "IPC write");
        ok(self.g.done(&CuCtxSynchronize {}), "IPC synchronize");
        let handle = ok(self.g.ipc_export(dptr), "IPC export");
        println!("SOAK EXPORT {round} {}", hex(&handle));
        std::io::stdout().flush().unwrap();
        let want = format!("DONE {round}");
        loop {
            match self.inbox.recv_timeout(GUARD) {
                Ok(line) if line == want => break,
                Ok(_) => {}
                Err(_) => fail(&format!("no {want} from the pair")),
            }
        }
        let got = ok(self.g.read(dptr, IPC_BYTES), "IPC read back");
        if got.iter().zip(&data).any(|(g, d)| *g != !d) {
            fail(&format!("IPC round {round}: the pair's writes did not arrive"));
        }
        self.verified += IPC_BYTES as u64;
        ok(self.g.done(&CuMemFreeV2 { dptr }), "IPC free");
        self.ipc += 1;
    }

    /// An importer's side of round `round`: open, check, overwrite (inverted), close.
    fn import_round(&mut self, round: u64, handle: &[u8]) {
        let q = ok(self.g.ipc_open(handle, LAZY), "IPC open");
        let got = ok(self.g.read(q, IPC_BYTES), "IPC read");
        if got != ipc_data(self.pair, round) {
            fail(&format!("IPC round {round}: the import does not hold the exporter's bytes"));
        }
        self.verified += IPC_BYTES as u64;
        let inverted: Vec<u8> = got.iter().map(|b| !b).collect();
        ok(self.g.write(q, &inverted), "IPC write");
        ok(self.g.done(&CuCtxSynchronize {}), "IPC synchronize");
        ok(self.g.ipc_close(q), "IPC close");
        if self.g.read(q, 16) != Err(code::INVALID_VALUE) {
            fail("a closed import is still readable");
        }
        println!("SOAK IMPORTED {round}");
        std::io::stdout().flush().unwrap();
        self.ipc += 1;
    }

    /// Handles what the hub sent (waiting for it with `block`), until it has said `END`.
    fn serve_inbox(&mut self, block: bool) {
        while !self.ended {
            let line = if block {
                match self.inbox.recv_timeout(GUARD) {
                    Ok(l) => l,
                    Err(_) => fail("no END from the hub"),
                }
            } else {
                match self.inbox.try_recv() {
                    Ok(l) => l,
                    Err(_) => return,
                }
            };
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("IMPORT"), Some(round), Some(handle)) => {
                    self.import_round(round.parse().unwrap(), &unhex(handle))
                }
                (Some("END"), _, _) => self.ended = true,
                _ => fail(&format!("unexpected line from the hub: {line}")),
            }
        }
    }

    fn run(mut self, secs: u64) {
        let until = Instant::now() + Duration::from_secs(secs);
        let mut round = 0;
        while self.role == Role::Victim || Instant::now() < until {
            self.step();
            match self.role {
                Role::Exporter if self.ops % 24 == 0 => {
                    round += 1;
                    self.export_round(round);
                }
                Role::Importer => self.serve_inbox(false),
                _ => {}
            }
        }
        // The end: everything checked once more, freed, and the zone empty again.
        while !self.blocks.is_empty() {
            self.free();
        }
        if self.quota != 0 {
            self.check_accounting();
        }
        if self.role == Role::Importer {
            self.serve_inbox(true);
        }
        let Client { ops, verified, launches, ipc, out_of_memory, .. } = self;
        println!("SOAK FINISHED ops={ops} verified={verified} launches={launches} ipc={ipc} oom={out_of_memory}");
        std::io::stdout().flush().unwrap();
    }
}

/// Child-process role of the soak: one client zone (see [`Role`]), configured by the
/// `VGPU_SOAK_*` variables the hub sets. Prints `SOAK …` lines for the hub.
#[test]
fn soak_client_role() {
    let Ok(socket) = std::env::var("VGPU_SOAK_SOCKET") else { return };
    let role = match std::env::var("VGPU_SOAK_ROLE").unwrap().as_str() {
        "steady" => Role::Steady,
        "exporter" => Role::Exporter,
        "importer" => Role::Importer,
        _ => Role::Victim,
    };
    let mut g = Guest::connect(Path::new(&socket));
    let hmod = ok(g.load_module(FILL_PTX), "module load");
    let fill = ok(
        g.call::<_, CuModuleGetFunctionReply>(&CuModuleGetFunction { hmod, name: "fill_u32".into() }),
        "get function",
    )
    .hfunc;
    let stream = g.stream();
    let (tx, inbox) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    println!("SOAK READY");
    std::io::stdout().flush().unwrap();
    let client = Client {
        g,
        role,
        rng: Rng::new(env_or("VGPU_SOAK_CLIENT_SEED", 1)),
        fill,
        stream,
        blocks: Vec::new(),
        quota: env_or("VGPU_SOAK_QUOTA", 0),
        pair: env_or("VGPU_SOAK_PAIR", 0),
        inbox,
        ended: false,
        ops: 0,
        verified: 0,
        launches: 0,
        ipc: 0,
        out_of_memory: 0,
    };
    client.run(env_or("VGPU_SOAK_SECS", 20));
}

// ---- the hub ----

/// What the soak runs with.
#[derive(Clone, Debug)]
struct Plan {
    secs: u64,
    zones: usize,
    seed: u64,
    /// Each client zone has a uid of its own (the test runs as root).
    own_uids: bool,
}

impl Plan {
    fn from_env() -> Plan {
        let seed = std::env::var("VGPU_SOAK_SEED")
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            .unwrap_or_else(|| {
                let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
                t.as_nanos() as u64 ^ u64::from(std::process::id())
            });
        let me = std::fs::metadata("/proc/self").unwrap().uid();
        let zones = env_or("VGPU_SOAK_ZONES", 16usize).max(VICTIMS + 2);
        Plan {
            secs: env_or("VGPU_SOAK_SECS", 20),
            zones,
            seed,
            own_uids: me == 0 && std::env::var_os("VGPU_SOAK_ONE_UID").is_none(),
        }
    }

    fn name(&self, zone: usize) -> String {
        if zone < VICTIMS {
            format!("victim-{zone:02}")
        } else {
            format!("steady-{zone:02}")
        }
    }

    /// The role of steady zone `zone`: pairs of zones do IPC (the last one, if odd, not).
    fn role(&self, zone: usize) -> Role {
        let k = zone - VICTIMS;
        match (k % 2, zone + 1 < self.zones || k % 2 == 1) {
            (0, true) => Role::Exporter,
            (1, _) => Role::Importer,
            _ => Role::Steady,
        }
    }

    /// The IPC partner of a steady zone.
    fn partner(&self, zone: usize) -> usize {
        if (zone - VICTIMS) % 2 == 0 {
            zone + 1
        } else {
            zone - 1
        }
    }

    /// The daemon's configuration: one `[[zone]]` per client zone (with uids of their own),
    /// the hub's own "hostile" zone, and a sharing group per IPC pair.
    fn config(&self, socket: &Path) -> String {
        let me = std::fs::metadata("/proc/self").unwrap().uid();
        let mut c = format!(
            "socket = {socket:?}\nbackend = \"{}\"\nsim_memory_bytes = {}\nxen = \"off\"\n",
            backend(),
            4u64 << 30
        );
        if self.own_uids {
            c.push_str(&format!(
                "[quotas]\nmem_bytes = {ZONE_QUOTA}\nmax_handles = 128\nmax_async_in_flight = 64\nmax_sessions = 4\ncontext_mem_bytes = 0\n"
            ));
            for z in 0..self.zones {
                c.push_str(&format!("[[zone]]\nname = \"{}\"\nuid = {}\n", self.name(z), BASE_UID + z as u32));
            }
            c.push_str(&format!(
                "[[zone]]\nname = \"hostile\"\nuid = {me}\nquotas = {{ mem_bytes = 1048576, max_handles = 16, max_async_in_flight = 16, max_sessions = 8, context_mem_bytes = 0 }}\n"
            ));
            for z in (VICTIMS..self.zones).filter(|&z| self.role(z) == Role::Exporter) {
                c.push_str(&format!(
                    "[[sharing_group]]\nname = \"pair-{z:02}\"\nzones = [\"{}\", \"{}\"]\n",
                    self.name(z),
                    self.name(z + 1)
                ));
            }
        } else {
            // One zone for everything: room for every client at once.
            let n = self.zones as u64 + 2;
            c.push_str(&format!(
                "[quotas]\nmem_bytes = {}\nmax_handles = {}\nmax_async_in_flight = 64\nmax_sessions = 64\ncontext_mem_bytes = 0\n",
                n * ZONE_QUOTA,
                n * 128
            ));
        }
        c
    }

    /// A client process for zone `zone` (its `incarnation`-th), its output read into `hub`.
    fn spawn_client(&self, socket: &Path, zone: usize, incarnation: u64, hub: &Sender<Note>) -> ClientProcess {
        let role = if zone < VICTIMS { Role::Victim } else { self.role(zone) };
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "soak_client_role", "--nocapture", "--test-threads=1"])
            .env("VGPU_SOAK_SOCKET", socket)
            .env("VGPU_SOAK_ROLE", format!("{role:?}").to_lowercase())
            .env("VGPU_SOAK_SECS", self.secs.to_string())
            .env("VGPU_SOAK_CLIENT_SEED", (self.seed ^ ((zone as u64) << 32) ^ incarnation).to_string())
            .env("VGPU_SOAK_QUOTA", if self.own_uids { ZONE_QUOTA.to_string() } else { "0".into() })
            .env("VGPU_SOAK_PAIR", (self.seed ^ zone.min(self.partner_or_self(zone)) as u64).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if self.own_uids {
            cmd.uid(BASE_UID + zone as u32).gid(BASE_UID + zone as u32);
        }
        let mut child = cmd.spawn().expect("spawn a soak client");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let hub = hub.clone();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                // libtest's "test … " may precede a line.
                if let Some(at) = line.find("SOAK ") {
                    let _ = hub.send(Note::Line { zone, incarnation, text: line[at + 5..].to_owned() });
                }
            }
            let _ = hub.send(Note::Eof { zone, incarnation });
        });
        ClientProcess { child, stdin }
    }

    fn partner_or_self(&self, zone: usize) -> usize {
        if zone < VICTIMS || self.role(zone) == Role::Steady {
            zone
        } else {
            self.partner(zone)
        }
    }
}

/// A client process and its standard input; killed (if still running) when dropped, so
/// that a failed soak leaves none behind.
struct ClientProcess {
    child: Child,
    stdin: ChildStdin,
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the client processes' reader threads tell the hub.
enum Note {
    Line { zone: usize, incarnation: u64, text: String },
    Eof { zone: usize, incarnation: u64 },
}

/// The daemon's resident memory (`VmRSS`), in bytes.
fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS");
    kb.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
}

/// As `wait_for`, with the soak's longer guard.
fn wait_long(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sleeps about `ms` milliseconds, or less once `stop` is set.
fn nap(stop: &AtomicBool, ms: u64) {
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10).min(until - Instant::now()));
    }
}

/// A session of the hub's own zone that may be refused (the flood keeps it full) or fail:
/// `None` then.
fn hub_session(socket: &Path) -> Option<Guest> {
    let mut g = Guest::session_with(socket, policy()).ok()?;
    match g.call_raw::<_, AttachReply>(&Attach { revision: VGPU_PROTOCOL_REVISION }) {
        Ok(r) => {
            g.zone = r.zone;
            g.primary = r.primary_ctx;
            Some(g)
        }
        Err(_) => None,
    }
}

/// Whether the report has a session numbered `zone`.
fn has_session(d: &Daemon, zone: u32) -> bool {
    let prefix = format!("zone {zone} ");
    d.zones().iter().any(|l| l.starts_with(&prefix))
}

/// What the hostile thread did.
#[derive(Debug, Default)]
struct Hostility {
    refused_frames: u64,
    scribbles: u64,
    bad_bodies: u64,
    unknown_ids: u64,
    no_session: u64,
}

/// The hostile client: sessions of the hub's zone that write frames the host must refuse
/// (each session must then be failed), scribble over their rings (any outcome but a hang
/// or harm to other zones), or send bodies and ids the host does not know (a clear error,
/// and the session serves on).
fn hostile(d: &Daemon, mut rng: Rng, stop: &AtomicBool) -> Hostility {
    let mut h = Hostility::default();
    let hdr = |len: u32, id: u16, flags: u8| {
        let mut b =
            idm_core::FrameHeader { len, id: MessageId(id), flags: idm_core::wire::Flags::empty(), seq: 7, aux: 0 }
                .emit();
        b[6] |= flags;
        b
    };
    while !stop.load(Ordering::Relaxed) {
        nap(stop, 10 + rng.below(40));
        let Some(mut g) = hub_session(&d.socket) else {
            h.no_session += 1;
            continue;
        };
        match rng.below(5) {
            0 => {
                let frame = match rng.below(3) {
                    // A frame of several slots whose later slots were never stamped.
                    0 => hdr(60 + rng.below(4000) as u32, 0x0200, 0),
                    // A length beyond every limit.
                    1 => hdr(u32::MAX - rng.below(1000) as u32, 0x0200, 0),
                    // Flag bits nobody defined.
                    _ => hdr(0, 0x0200, 0xf0),
                };
                poke_frame(&g, frame);
                g.client.channel_mut().notify_peer().unwrap();
                let zone = g.zone;
                wait_long("a hostile session failed after a bad frame", || !has_session(d, zone));
                h.refused_frames += 1;
            }
            1 => {
                // Random bytes over the request ring — header words, slots and stamps — or
                // over the reply ring's header, then a request whose outcome is not
                // asserted: only that it ends (the wait is bounded) and hurts no one else.
                let base = if rng.below(2) == 0 { ring_base(&g) } else { g.layout.server_to_client_offset() };
                for _ in 0..1 + rng.below(8) {
                    let span = field::DATA + 4 * SLOT;
                    let at = base + rng.below(span as u64) as usize;
                    let bytes = rng.junk(SLOT_PAYLOAD as u64 + 4);
                    let end = (at + bytes.len()).min(base + span).max(at);
                    g.region.write_bytes(at, &bytes[..end - at]);
                }
                let _ = g.client.channel_mut().notify_peer();
                let _ = g.call_raw::<_, Done>(&CuCtxSynchronize {});
                h.scribbles += 1;
            }
            2 => {
                #[derive(serde::Serialize, serde::Deserialize)]
                struct Garbage(Vec<u8>);
                impl Message for Garbage {
                    const ID: MessageId = CuMemAllocV2::ID;
                }
                let junk = Garbage(rng.junk(64));
                match g.call_raw::<_, CuMemAllocV2Reply>(&junk) {
                    // Some junk decodes as a request (an allocation): it is served as one.
                    Ok(_) | Err(ChannelError::Remote { .. }) => {}
                    Err(e) => panic!("a bad body broke the channel: {e}"),
                }
                assert!(g.alloc(16).is_ok(), "the session serves on after a bad body");
                h.bad_bodies += 1;
            }
            _ => {
                #[derive(serde::Serialize, serde::Deserialize)]
                struct Unknown(Vec<u8>);
                impl Message for Unknown {
                    const ID: MessageId = MessageId(0x7ff0);
                }
                let e = g.call_raw::<_, Done>(&Unknown(rng.bytes(32))).unwrap_err();
                assert_eq!(e, ChannelError::Remote { kind: ErrorKind::UnknownMessage, code: code::NOT_SUPPORTED });
                assert!(g.alloc(16).is_ok(), "the session serves on after an unknown request");
                h.unknown_ids += 1;
            }
        }
    }
    h
}

/// What the flood thread did.
#[derive(Debug, Default)]
struct Flood {
    sessions: u64,
    refused: u64,
    half_handshakes: u64,
    failed: u64,
}

/// Sessions of the hub's zone on and off: a few held a while, now and then a burst until
/// the zone's `max_sessions` refuses one, connections dropped at once or in the middle of
/// the offer.
fn flood(d: &Daemon, mut rng: Rng, stop: &AtomicBool) -> Flood {
    let mut f = Flood::default();
    let mut open = VecDeque::new();
    // `true` when refused.
    let session = |open: &mut VecDeque<Guest>, f: &mut Flood| match Guest::session_with(&d.socket, policy()) {
        Ok(mut g) => match g.call_raw::<_, AttachReply>(&Attach { revision: VGPU_PROTOCOL_REVISION }) {
            Ok(_) => {
                f.sessions += 1;
                open.push_back(g);
                false
            }
            Err(ChannelError::Remote { code: code::NOT_PERMITTED, .. }) => {
                f.refused += 1;
                true
            }
            Err(_) => {
                f.failed += 1;
                false
            }
        },
        Err(_) => {
            f.failed += 1;
            false
        }
    };
    while !stop.load(Ordering::Relaxed) {
        nap(stop, 20 + rng.below(40));
        match rng.below(20) {
            0..=9 => {
                session(&mut open, &mut f);
                while open.len() > 2 {
                    open.pop_front();
                }
            }
            10 => {
                for _ in 0..10 {
                    if session(&mut open, &mut f) {
                        break;
                    }
                }
                open.clear();
            }
            11..=13 => {
                if let Ok(mut s) = std::os::unix::net::UnixStream::connect(&d.socket) {
                    // Nothing, or part of an offer: the worker's handshake fails.
                    let _ = s.write_all(&rng.junk(20));
                    f.half_handshakes += 1;
                }
            }
            _ => open.clear(),
        }
    }
    f
}

/// What the chaos thread did.
#[derive(Debug, Default)]
struct Chaos {
    kills: u64,
    /// Victims that had ended on their own before being killed (failures).
    died: Vec<String>,
}

/// Kills a random victim client every so often, waits until its session — as root, its
/// whole zone, so its memory — is gone from the report, and starts a new one in its place.
fn chaos(d: &Daemon, plan: &Plan, mut rng: Rng, stop: &AtomicBool, hub: &Sender<Note>) -> Chaos {
    let mut c = Chaos::default();
    let mut incarnations = [0u64; VICTIMS];
    let mut victims: Vec<ClientProcess> = (0..VICTIMS).map(|v| plan.spawn_client(&d.socket, v, 0, hub)).collect();
    let kill = |v: usize, mut victim: ClientProcess, c: &mut Chaos| {
        let child = &mut victim.child;
        let pid = child.id();
        if let Some(status) = child.try_wait().unwrap() {
            c.died.push(format!("victim {v} (pid {pid}) ended on its own: {status}"));
        }
        let _ = child.kill();
        child.wait().unwrap();
        let peer = format!("peer_pid={pid} ");
        let name = format!("name={} ", plan.name(v));
        wait_long("a killed client's session gone", || {
            !d.zones().iter().any(|l| l.contains(&peer) || (plan.own_uids && l.contains(&name)))
        });
        c.kills += 1;
    };
    while !stop.load(Ordering::Relaxed) {
        nap(stop, 100 + rng.below(700));
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let v = rng.below(VICTIMS as u64) as usize;
        let victim = victims.swap_remove(v);
        kill(v, victim, &mut c);
        incarnations[v] += 1;
        let fresh = plan.spawn_client(&d.socket, v, incarnations[v], hub);
        victims.push(fresh);
        victims.swap(v, VICTIMS - 1);
    }
    for (v, victim) in victims.into_iter().enumerate() {
        kill(v, victim, &mut c);
    }
    c
}

/// The soak (see the module docs).
#[test]
fn soak_mixed_load_with_chaos() {
    if backend() != "sim" {
        return; // a simulated GPU's test: bounded memory, no real device time
    }
    let plan = Plan::from_env();
    eprintln!(
        "soak: seed {:#x} (VGPU_SOAK_SEED={:x} repeats its choices), {} zones ({}), {} s",
        plan.seed,
        plan.seed,
        plan.zones,
        if plan.own_uids { "a uid each" } else { "sessions of one uid" },
        plan.secs
    );
    let dir = std::env::temp_dir().join(format!("vgpu-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("hp.sock");
    let config = dir.join("hp.toml");
    std::fs::write(&config, plan.config(&socket)).unwrap();
    let log = std::env::var("VGPU_SOAK_LOG").unwrap_or_else(|_| "error".into());
    let d = Daemon::serve(config, socket.clone(), TempDir(dir), &log);
    if plan.own_uids {
        // Clients of other uids must be able to connect (a unix socket needs write access).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let rss_start = vm_rss(d.child.id());
    let mut rng = Rng::new(plan.seed);

    let (hub_tx, hub) = std::sync::mpsc::channel();
    let mut steady: Vec<Option<ClientProcess>> =
        (0..plan.zones).map(|z| (z >= VICTIMS).then(|| plan.spawn_client(&d.socket, z, 0, &hub_tx))).collect();
    // A session of the hub's zone, which is in no sharing group: it must never open another
    // zone's export.
    let mut outsider = Guest::connect(&d.socket);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let forwarded = AtomicU64::new(0);
    let (mut failures, mut finished, mut ready) = (Vec::new(), Vec::new(), 0);
    let (chaos_rng, hostile_rng, flood_rng) = (Rng::new(rng.next()), Rng::new(rng.next()), Rng::new(rng.next()));
    let (chaos, hostility, flooding) = std::thread::scope(|s| {
        let chaos = s.spawn(|| chaos(&d, &plan, chaos_rng, &stop, &hub_tx));
        let hostile = s.spawn(|| hostile(&d, hostile_rng, &stop));
        let flood = s.spawn(|| flood(&d, flood_rng, &stop));
        let steady_count = plan.zones - VICTIMS;
        while finished.len() < steady_count {
            assert!(
                started.elapsed() < Duration::from_secs(plan.secs) + GUARD,
                "the soak hangs: {finished:?} finished"
            );
            let note = match hub.recv_timeout(Duration::from_millis(200)) {
                Ok(n) => n,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => unreachable!("the hub holds a sender"),
            };
            match note {
                Note::Line { zone, incarnation, text } => {
                    let mut words = text.split_whitespace();
                    match words.next() {
                        Some("READY") if zone >= VICTIMS => ready += 1,
                        Some("FAILED") => failures.push(format!("{} (#{incarnation}): {text}", plan.name(zone))),
                        Some("EXPORT") => {
                            let (round, handle) = (words.next().unwrap(), words.next().unwrap());
                            if plan.own_uids && rng.below(4) == 0 {
                                let e = outsider.ipc_open(&unhex(handle), LAZY);
                                assert_eq!(e, Err(code::NOT_PERMITTED), "an outsider opened a group's export");
                            }
                            let stdin = &mut steady[plan.partner(zone)].as_mut().unwrap().stdin;
                            writeln!(stdin, "IMPORT {round} {handle}").unwrap();
                            forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                        Some("IMPORTED") => {
                            let stdin = &mut steady[plan.partner(zone)].as_mut().unwrap().stdin;
                            writeln!(stdin, "DONE {}", words.next().unwrap()).unwrap();
                        }
                        Some("FINISHED") => {
                            eprintln!("soak: {} {text}", plan.name(zone));
                            finished.push(zone);
                            if plan.role(zone) == Role::Exporter {
                                let stdin = &mut steady[plan.partner(zone)].as_mut().unwrap().stdin;
                                writeln!(stdin, "END").unwrap();
                            }
                        }
                        _ => {}
                    }
                }
                Note::Eof { zone, incarnation } => {
                    if zone >= VICTIMS && !finished.contains(&zone) {
                        failures.push(format!("{} (#{incarnation}) ended before it finished", plan.name(zone)));
                        finished.push(zone);
                    }
                }
            }
            if !failures.is_empty() {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        (chaos.join().unwrap(), hostile.join().unwrap(), flood.join().unwrap())
    });
    assert!(failures.is_empty(), "soak failures (seed {:#x}):\n{}", plan.seed, failures.join("\n"));
    assert!(chaos.died.is_empty(), "victims that died on their own: {:?}", chaos.died);
    assert_eq!(ready, plan.zones - VICTIMS, "every steady zone started");
    for (z, client) in steady.iter_mut().enumerate() {
        if let Some(ClientProcess { child, .. }) = client {
            let status = child.wait().unwrap();
            assert!(status.success(), "{}: {status}", plan.name(z));
        }
    }
    eprintln!(
        "soak: {} victims killed, IPC exports relayed {}, hostile {hostility:?}, flood {flooding:?}",
        chaos.kills,
        forwarded.load(Ordering::Relaxed)
    );
    assert!(chaos.kills >= VICTIMS as u64, "every victim was killed at least at the end");
    assert!(hostility.refused_frames + hostility.scribbles + hostility.bad_bodies + hostility.unknown_ids > 0);
    if plan.own_uids {
        assert!(flooding.refused > 0, "the flood went past the zone's max_sessions");
    }

    // Every session is gone (the flood's and the hostile ones included): every zone's
    // accounting is back to zero, its ledger dropped.
    drop(outsider);
    wait_long("every session gone", || d.zones().is_empty());
    let rss_end = vm_rss(d.child.id());
    eprintln!("soak: daemon VmRSS {} KiB at the start, {} KiB at the end", rss_start >> 10, rss_end >> 10);
    assert!(rss_end.saturating_sub(rss_start) < RSS_GROWTH, "the daemon grew by {} KiB", (rss_end - rss_start) >> 10);
    // And it still serves.
    let mut g = Guest::connect(&d.socket);
    let p = g.alloc(MAX_BLOCK).unwrap();
    let data = Rng::new(plan.seed).bytes(MAX_BLOCK as usize);
    g.write(p, &data).unwrap();
    assert_eq!(g.read(p, data.len()).unwrap(), data);
}
