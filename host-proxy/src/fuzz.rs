//! Fuzz harnesses for what a hostile guest (or a compromised worker) reaches behind the
//! ring: shared by the cargo-fuzz targets in `host-proxy/fuzz/` and by this module's tests,
//! which replay the committed corpus in plain `cargo test` and keep the seed files current.
//!
//! A harness panics only when host-proxy breaks a promise; hostile input must come back
//! as an error. The targets:
//!
//! * [`zone_requests`]: sequences of requests through the generated dispatch into three
//!   zones on the simulated GPU (a test double), two of one tenant and a stranger, with
//!   an in-process IPC broker between them. Each request's body is built from tokens that
//!   draw handles and addresses from what earlier replies returned (and from memory the
//!   zone must not reach), or forge them. After every step the zone's accounting is
//!   recomputed from its tables ([`Zone::audit`]) and compared with what the simulated
//!   GPU holds; memory planted beside the zone (another tenant's, as far as the zone
//!   knows) must stay allocated and unchanged; a zone ended mid-sequence (its worker
//!   killed) must leave nothing behind.
//! * [`module_image`]: module images as `cuModuleLoadData` gets them — the fat binary
//!   walk, and loading through a zone (ELF, fat binary, PTX).
//! * [`xen_offer`]: the keys a guest writes into its xenstore frontend directory.
//! * [`xenstore_replies`]: the byte stream from xenstored, as answers to a client's
//!   requests and as watch events.
//! * [`broker_frames`]: frames from workers on the IPC broker's channel, applied to the
//!   daemon's registry (policy and bookkeeping checked after each).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a broken promise is a crash here

use crate::backend::sim::{SimGpu, SimHeld};
use crate::backend::GpuBackend;
use crate::broker::test_utils::{depart, Hub, LocalBroker};
use crate::broker::{self, may_open, Peer, Registry, Request, HANDLE_TAG, MAX_FRAME};
use crate::zone::{Quotas, Zone};
use idm_core::region::test_utils::heap_region;
use idm_core::wire::encode_body;
use idm_core::{DataWindow, Message, MessageId, RawRegion};
use std::cell::RefCell;
use std::rc::Rc;
use vgpu_proto::generated::{dispatch, CuGraphLaunch, Launch, Responder, REQUEST_IDS};

/// Named seed inputs of a target.
pub type Seeds = Vec<(&'static str, Vec<u8>)>;

/// A fuzz target.
#[derive(Clone, Copy)]
pub struct Target {
    /// Its name, and its corpus directory's.
    pub name: &'static str,
    /// The harness.
    pub run: fn(&[u8]),
    /// Its seed inputs.
    pub seeds: fn() -> Seeds,
}

/// The fuzz targets.
pub const TARGETS: [Target; 5] = [
    Target { name: "zone_requests", run: zone_requests, seeds: seeds::zone_requests },
    Target { name: "module_image", run: module_image, seeds: seeds::module_image },
    Target { name: "xen_offer", run: xen_offer, seeds: seeds::xen_offer },
    Target { name: "xenstore_replies", run: xenstore_replies, seeds: seeds::xenstore_replies },
    Target { name: "broker_frames", run: broker_frames, seeds: seeds::broker_frames },
];

/// Reads the fuzzer's bytes front to back; past the end every read is 0.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&[self.take(8), &[0u8; 8]].concat()[..8]);
        u64::from_le_bytes(b)
    }
}

/// postcard's varint of `v`.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

// ---- zone_requests ----

/// Zones under test at once.
const ZONES: usize = 3;
/// Each zone's data window.
const WINDOW: usize = 64 << 10;
/// Memory beside each zone that it must never reach.
const NEIGHBOUR: u64 = 4096;
/// Steps of one input (a bound on each execution's time).
const MAX_STEPS: usize = 96;
/// Values remembered from replies.
const POOL: usize = 64;

/// The quotas of the zones under test: small, so that the quotas are reached.
fn fuzz_quotas() -> Quotas {
    Quotas {
        mem_bytes: 8 << 20,
        max_handles: 48,
        max_async_in_flight: 16,
        max_sessions: 8,
        context_mem_bytes: Some(1 << 20),
    }
}

/// One zone under test, its window, and the memory planted beside it.
struct Subject {
    zone: Zone<SimGpu>,
    window: DataWindow<RawRegion>,
    _mem: Vec<u64>,
    conn: u32,
    neighbour: u64,
    pattern: Vec<u8>,
}

impl Subject {
    /// Zone `conn` in slot `slot` of the harness (slot 2 is the stranger).
    fn new(slot: usize, conn: u32, hub: &Rc<RefCell<Hub>>) -> Subject {
        let mut sim = SimGpu::new(64 << 20);
        let neighbour = sim.mem_alloc(NEIGHBOUR).unwrap();
        let pattern: Vec<u8> = (0..NEIGHBOUR).map(|i| (i as u8) ^ (conn as u8).wrapping_mul(37)).collect();
        sim.poke(neighbour, &pattern).unwrap();
        let mut zone = Zone::new(conn, sim, fuzz_quotas());
        // Two zones of one tenant (IPC between them is allowed), the third a stranger.
        let name = if slot == 2 { "stranger" } else { "tenant" };
        let peer = Peer { conn, zone: name.into(), uid: 1000 + u32::from(name == "stranger"), groups: Vec::new() };
        zone.set_broker(Box::new(LocalBroker::join(hub, peer)));
        let (mem, region) = heap_region(WINDOW);
        Subject { zone, window: DataWindow::new(region), _mem: mem, conn, neighbour, pattern }
    }

    /// The zone's invariants, and its accounting against what the simulated GPU holds.
    fn check(&mut self, ran_kernels: bool) {
        let audit = self.zone.audit().unwrap_or_else(|e| panic!("zone {}: {e}", self.conn));
        let held = self.zone.backend().held();
        assert_eq!(
            audit.device_bytes + NEIGHBOUR,
            held.user_bytes + held.phys_bytes + held.array_bytes,
            "zone {}: its accounting against the device's {held:?}",
            self.conn
        );
        let sim = self.zone.backend_mut();
        let now = sim.peek(self.neighbour, NEIGHBOUR).expect("the neighbour's memory is still allocated");
        if now != self.pattern {
            // Kernels are not checked by the zone: on the GPU, another process's address
            // faults in the zone's own context. The test double has one address space, so
            // a kernel given the neighbour's address reaches it; nothing else may.
            assert!(ran_kernels, "zone {}: a request that runs no kernel changed the neighbour's memory", self.conn);
            sim.poke(self.neighbour, &self.pattern).unwrap();
        }
    }

    /// Ends the zone as its worker does, and checks that it left nothing on the device.
    fn end(mut self, hub: &Rc<RefCell<Hub>>) {
        self.zone.teardown();
        let held = self.zone.backend().held();
        let left = SimHeld { user_bytes: NEIGHBOUR, allocations: 1, ..SimHeld::default() };
        assert_eq!(held, left, "zone {}: what the device holds after teardown", self.conn);
        assert_eq!(self.zone.mem_used(), 0);
        assert_eq!(self.zone.live_objects(), 0);
        depart(hub, self.conn);
        assert_eq!(hub.borrow().registry.exports_of(self.conn), 0, "exports of a departed zone");
    }
}

/// Values from replies (handles, addresses, sizes) and IPC handles, for later requests.
#[derive(Default)]
struct Pool {
    values: Vec<u64>,
    blobs: Vec<Vec<u8>>,
}

impl Pool {
    fn remember(&mut self, v: u64) {
        if v >= 1 << 12 && !self.values.contains(&v) {
            if self.values.len() == POOL {
                self.values.remove(0);
            }
            self.values.push(v);
        }
    }
    /// The `back`-th most recent value.
    fn recent(&self, back: u8) -> u64 {
        let n = self.values.len();
        if n == 0 {
            return 0;
        }
        self.values[n - 1 - usize::from(back) % n]
    }
    /// Every varint of a reply's encoding (its handles, addresses and sizes among them),
    /// and an IPC handle it carries.
    fn harvest(&mut self, body: &[u8]) {
        let mut at = 0;
        while at < body.len() {
            let (mut v, mut shift) = (0u64, 0);
            while at < body.len() && shift < 64 {
                v |= u64::from(body[at] & 0x7f) << shift;
                shift += 7;
                at += 1;
                if body[at - 1] & 0x80 == 0 {
                    break;
                }
            }
            self.remember(v);
        }
        if let Some(i) = body.windows(HANDLE_TAG.len()).position(|w| w == HANDLE_TAG) {
            if let Some(h) = body.get(i..i + broker::HANDLE_LEN) {
                self.blobs.push(h.to_vec());
                if self.blobs.len() > 8 {
                    self.blobs.remove(0);
                }
            }
        }
    }
}

/// Collects each reply's values into the pool.
struct Harvest<'p> {
    pool: &'p mut Pool,
    buf: &'p mut Vec<u8>,
}

impl Responder for Harvest<'_> {
    type Error = ();
    fn reply<M: Message>(&mut self, reply: &M) -> Result<(), ()> {
        let body = encode_body(reply, self.buf).expect("a reply fits 64 KiB");
        self.pool.harvest(body);
        Ok(())
    }
}

/// A request body from tokens: postcard is a sequence of varints, bytes and
/// length-prefixed strings, so tokens of those shapes build the bodies of every request.
fn body(input: &mut Input<'_>, pool: &Pool, subject: &Subject) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..48 {
        if input.is_empty() {
            break;
        }
        match input.u8() % 10 {
            0 => break,
            1 => varint(&mut out, pool.recent(input.u8())),
            2 => {
                let (v, delta) = (pool.recent(input.u8()), input.u16() as i16);
                varint(&mut out, v.wrapping_add_signed(i64::from(delta)));
            }
            3 => varint(&mut out, u64::from(input.u8())),
            4 => varint(&mut out, input.u64()),
            5 => {
                let n = usize::from(input.u8() % 64);
                out.extend_from_slice(input.take(n));
            }
            6 => {
                // A window range: offset and length.
                varint(&mut out, u64::from(input.u16()));
                varint(&mut out, u64::from(input.u16()));
            }
            7 => {
                let n = input.u8() % 48;
                varint(&mut out, u64::from(n));
                out.extend_from_slice(input.take(usize::from(n)));
            }
            8 => {
                let h = pool.blobs.get(usize::from(input.u8()) % pool.blobs.len().max(1));
                let h = h.cloned().unwrap_or_default();
                varint(&mut out, h.len() as u64);
                out.extend_from_slice(&h);
            }
            _ => {
                // Another tenant's memory, or just past it.
                let off = u64::from(input.u16()) % (NEIGHBOUR + 64);
                varint(&mut out, subject.neighbour + off);
            }
        }
    }
    out
}

/// Whether `VGPU_FUZZ_TRACE` asks for each step to be printed (to see what an input does).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("VGPU_FUZZ_TRACE").is_some())
}

/// `zone_requests`: the input is a sequence of steps, each a request to one of the zones
/// (an id and a token-built body), a write into a zone's window, or the end of a zone's
/// session (its worker killed; a fresh session takes its place).
pub fn zone_requests(data: &[u8]) {
    zone_requests_answered(data);
}

/// [`zone_requests`], returning how many requests were dispatched and how many answered
/// with a reply (not an error).
fn zone_requests_answered(data: &[u8]) -> (u32, u32) {
    let (mut sent, mut answered) = (0, 0);
    let mut input = Input(data);
    let hub = Rc::new(RefCell::new(Hub::default()));
    let mut next_conn = 0u32;
    let mut subjects: Vec<Subject> = (0..ZONES)
        .map(|slot| {
            next_conn += 1;
            Subject::new(slot, next_conn, &hub)
        })
        .collect();
    let mut pool = Pool::default();
    let mut buf = vec![0u8; 64 << 10];
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        let op = input.u8();
        let which = usize::from(op & 3) % ZONES;
        match (op >> 2) % 8 {
            0..=4 => {
                let id = REQUEST_IDS[usize::from(input.u16()) % REQUEST_IDS.len()];
                let s = &mut subjects[which];
                let body = body(&mut input, &pool, s);
                s.zone.poll_ipc();
                let mut responder = Harvest { pool: &mut pool, buf: &mut buf };
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let r = dispatch(&mut s.zone.api(&s.window), id, &body, &mut responder);
                    if trace() {
                        eprintln!("zone {} request {id:?} ({} bytes): {r:?}", s.conn, body.len());
                    }
                    r.is_ok()
                }));
                sent += 1;
                answered += u32::from(matches!(outcome, Ok(true)));
                if let Err(panic) = outcome {
                    // The test double's deliberate panic stands in for a host bug: the worker
                    // ends the session, and so does this. Any other panic is a bug.
                    let msg = panic.downcast_ref::<&str>().copied().unwrap_or_default();
                    if !msg.contains("vgpu_test_panic") {
                        std::panic::resume_unwind(panic);
                    }
                    next_conn += 1;
                    let fresh = Subject::new(which, next_conn, &hub);
                    std::mem::replace(&mut subjects[which], fresh).end(&hub);
                    continue;
                }
                s.zone.publish_usage();
                s.check(id == Launch::ID || id == CuGraphLaunch::ID);
            }
            5 | 6 => {
                let s = &subjects[which];
                let offset = u64::from(input.u16());
                let n = usize::from(input.u8());
                let bytes = input.take(n);
                let at = idm_core::BulkRef { offset, len: bytes.len() as u64 };
                let _ = s.window.write(at, bytes);
            }
            _ => {
                next_conn += 1;
                let fresh = Subject::new(which, next_conn, &hub);
                std::mem::replace(&mut subjects[which], fresh).end(&hub);
                // The others learn of the revocations at their next request; check them now.
                for s in &mut subjects {
                    s.zone.poll_ipc();
                    s.check(false);
                }
            }
        }
    }
    for s in subjects {
        s.end(&hub);
    }
    (sent, answered)
}

// ---- module_image ----

/// `module_image`: the input is a module image. The fat binary walk must give payloads
/// inside the image, in order and without overlap; a zone loading it (as a module and as
/// a library) must answer, and what it loaded must go with the zone.
pub fn module_image(data: &[u8]) {
    if let Some(payloads) = crate::image::fatbin_payloads(data) {
        let range = data.as_ptr_range();
        let mut last = range.start;
        for p in payloads {
            let r = p.as_ptr_range();
            assert!(r.start >= last && r.end <= range.end, "a payload outside the image or out of order");
            last = r.end;
        }
    }
    if data.len() > WINDOW {
        return;
    }
    let hub = Rc::new(RefCell::new(Hub::default()));
    let mut s = Subject::new(0, 1, &hub);
    let at = idm_core::BulkRef { offset: 0, len: data.len() as u64 };
    s.window.write(at, data).unwrap();
    for library in [false, true] {
        let load = vgpu_proto::generated::ModuleLoad { image: at, library };
        let _ = vgpu_proto::generated::Api::module_load(&mut s.zone.api(&s.window), load);
        s.check(false);
    }
    s.end(&hub);
}

// ---- xen_offer ----

/// The frontend directory of the offer.
const OFFER_DIR: &str = "/local/domain/5/device/vgpu/0";

/// A message as xenstored sends it (`struct xsd_sockmsg`, then the payload).
fn xs_message(ty: u32, req_id: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + body.len());
    for w in [ty, req_id, 0, body.len() as u32] {
        m.extend_from_slice(&w.to_ne_bytes());
    }
    m.extend_from_slice(body);
    m
}

/// `xen_offer`: the input is the values of a frontend's keys, separated by `\n`, in the
/// order the backend reads them (protocol-version, ring-size, window-size, nr-pages,
/// nr-ring-refs, ring-ref0…, event-channel); an empty value is an absent key. They are
/// xenstored's answers on a socket, written before the backend asks (no thread, no fake
/// daemon, so the target runs fast). An accepted offer must be within the backend's limits
/// and self-consistent.
pub fn xen_offer(data: &[u8]) {
    xen_offer_accepted(data);
}

/// [`xen_offer`], saying whether the offer was accepted.
fn xen_offer_accepted(data: &[u8]) -> bool {
    use idm_xen::channel::{read_offer, BackendLimits, MAX_DIR_PAGES, REFS_PER_DIR_PAGE};
    use std::io::Write;
    const READ: u32 = 2;
    const ERROR: u32 = 16;
    let limits = BackendLimits { max_ring_size: 1 << 20, max_window_size: 64 << 20 };
    let mut replies = Vec::new();
    for (i, v) in data.split(|&b| b == b'\n').take(MAX_DIR_PAGES + 8).enumerate() {
        let req = i as u32 + 1; // the client numbers its requests from 1
        replies.extend(if v.is_empty() { xs_message(ERROR, req, b"ENOENT\0") } else { xs_message(READ, req, v) });
    }
    if replies.len() > 32 << 10 {
        return false; // more than the socket holds without a reader
    }
    let (client, mut server) = std::os::unix::net::UnixStream::pair().unwrap();
    server.write_all(&replies).unwrap();
    server.shutdown(std::net::Shutdown::Write).unwrap();
    let mut xs = idm_xen::XenStore::from_stream(client);
    xs.set_reply_timeout(std::time::Duration::from_millis(50));
    let Ok(offer) = read_offer(&mut xs, OFFER_DIR, limits) else { return false };
    assert!(offer.layout.ring_size() <= limits.max_ring_size);
    assert!(offer.layout.window_size() <= limits.max_window_size);
    assert_eq!(offer.npages * idm_xen::XEN_PAGE_SIZE, offer.layout.total_size());
    assert_eq!(offer.dir_refs.len(), offer.npages.div_ceil(REFS_PER_DIR_PAGE));
    assert!(offer.dir_refs.len() <= MAX_DIR_PAGES);
    drop(server);
    true
}

// ---- xenstore_replies ----

/// `xenstore_replies`: the input is what xenstored sends. The first byte picks the
/// client's requests; the rest is the stream. Every call must return (the stream ends),
/// and none may panic.
pub fn xenstore_replies(data: &[u8]) {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let Some((&plan, stream)) = data.split_first() else { return };
    if stream.len() > 32 << 10 {
        return; // more than the socket holds without a reader
    }
    let (client, mut server) = UnixStream::pair().unwrap();
    server.write_all(stream).unwrap();
    // The client reads the stream to its end; its own requests still have a reader.
    server.shutdown(std::net::Shutdown::Write).unwrap();
    let mut xs = idm_xen::XenStore::from_stream(client);
    xs.set_reply_timeout(std::time::Duration::from_millis(50));
    for step in 0..8u8 {
        let _ = match (plan >> (step % 4)).wrapping_add(step) % 8 {
            0 => xs.read("/local/domain/5/device/vgpu/0/state").map(drop),
            1 => xs.directory("/local/domain").map(drop),
            2 => xs.write("/local/domain/0/backend/vgpu/5/0/state", b"4").map(drop),
            3 => xs.watch("@introduceDomain", "t").map(drop),
            4 => xs.next_watch_event(Some(std::time::Duration::ZERO)).map(drop),
            5 => xs.transaction_start().and_then(|tx| xs.transaction_end(tx, true)),
            6 => xs.get_perms("/local/domain/5").map(drop),
            _ => xs.get_domain_path(5).map(drop),
        };
    }
    drop(server);
}

// ---- broker_frames ----

/// `broker_frames`: the input is frames from three workers (each frame: a byte naming the
/// worker, then a length-prefixed frame as on the channel). The stream is split as the
/// worker's side splits it; each decoded request is applied to the registry as the daemon
/// does, and afterwards: an open succeeds only where the policy allows it, and a departed
/// worker holds no exports.
pub fn broker_frames(data: &[u8]) {
    let peers = [
        Peer { conn: 1, zone: "a".into(), uid: 1000, groups: vec!["g".into()] },
        Peer { conn: 2, zone: "b".into(), uid: 1001, groups: vec!["g".into()] },
        Peer { conn: 3, zone: "c".into(), uid: 1002, groups: Vec::new() },
    ];
    let mut registry = Registry::default();
    for p in &peers {
        registry.add_peer(p.clone());
    }
    let mut exporter_of = std::collections::HashMap::new();
    let mut input = Input(data);
    let mut next_token = 0u64;
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        let who = usize::from(input.u8()) % peers.len();
        let n = usize::from(input.u16()) % (MAX_FRAME + 64);
        let mut buf = input.take(n).to_vec();
        while let Ok(Some(body)) = broker::take_frame(&mut buf) {
            let Ok(req) = broker::decode_body::<Request>(&body) else { continue };
            let conn = peers[who].conn;
            match req.op {
                broker::Op::Export { payload, size } => {
                    next_token += 1;
                    let mut token = [0u8; 16];
                    token[..8].copy_from_slice(&next_token.to_le_bytes());
                    if let Ok(t) = registry.export(conn, payload, size, token) {
                        exporter_of.insert(t, who);
                    }
                }
                broker::Op::Open { token } => {
                    if registry.open(conn, &token).is_ok() {
                        let exporter = &peers[exporter_of[&token]];
                        assert!(may_open(exporter, &peers[who]).is_ok(), "an open the policy refuses");
                        assert_ne!(exporter.conn, conn, "an open in the exporting worker");
                    }
                }
                broker::Op::Revoke { token } => {
                    let _ = registry.revoke(conn, &token);
                }
                broker::Op::Close { token } => registry.close(conn, &token),
            }
        }
    }
    for p in &peers {
        let _ = registry.remove_peer(p.conn);
        assert_eq!(registry.exports_of(p.conn), 0);
    }
    // Every export is gone with its exporter: nothing opens any more.
    for token in exporter_of.keys() {
        assert!(registry.open(1, token).is_err() && registry.open(2, token).is_err());
    }
}

/// Seed inputs, built from the unit tests' fixtures.
pub mod seeds {
    use super::*;
    use vgpu_proto::generated::*;

    /// A token of a request body (see [`super::body`]).
    enum Tok<'a> {
        /// The `n`-th most recent value from replies.
        Recent(u8),
        /// A literal number.
        Num(u64),
        /// Raw bytes.
        Raw(&'a [u8]),
        /// A window range.
        Window(u16, u16),
        /// A length-prefixed string.
        Str(&'a str),
        /// The most recent IPC handle.
        IpcHandle,
        /// The neighbour's memory at an offset.
        Neighbour(u16),
    }

    /// Builds `zone_requests` inputs.
    #[derive(Default)]
    struct Seq(Vec<u8>);

    impl Seq {
        fn req(mut self, zone: u8, id: MessageId, toks: &[Tok<'_>]) -> Seq {
            let index = REQUEST_IDS.iter().position(|r| *r == id).expect("a request id") as u16;
            self.0.push(zone);
            self.0.extend_from_slice(&index.to_le_bytes());
            for t in toks {
                match t {
                    Tok::Recent(n) => self.0.extend_from_slice(&[1, *n]),
                    Tok::Num(v) if *v < 256 => self.0.extend_from_slice(&[3, *v as u8]),
                    Tok::Num(v) => {
                        self.0.push(4);
                        self.0.extend_from_slice(&v.to_le_bytes());
                    }
                    Tok::Raw(b) => {
                        self.0.extend_from_slice(&[5, b.len() as u8]);
                        self.0.extend_from_slice(b);
                    }
                    Tok::Window(o, l) => {
                        self.0.push(6);
                        self.0.extend_from_slice(&o.to_le_bytes());
                        self.0.extend_from_slice(&l.to_le_bytes());
                    }
                    Tok::Str(s) => {
                        self.0.extend_from_slice(&[7, s.len() as u8]);
                        self.0.extend_from_slice(s.as_bytes());
                    }
                    Tok::IpcHandle => self.0.extend_from_slice(&[8, 0xff]),
                    Tok::Neighbour(o) => {
                        self.0.push(9);
                        self.0.extend_from_slice(&o.to_le_bytes());
                    }
                }
            }
            self.0.push(0);
            self
        }
        fn write(mut self, zone: u8, offset: u16, bytes: &[u8]) -> Seq {
            self.0.push(zone | 5 << 2);
            self.0.extend_from_slice(&offset.to_le_bytes());
            self.0.push(bytes.len() as u8);
            self.0.extend_from_slice(bytes);
            self
        }
        fn end_session(mut self, zone: u8) -> Seq {
            self.0.push(zone | 7 << 2);
            self
        }
    }

    /// A module the simulated GPU runs (see the zone tests).
    const PTX: &[u8] = b".version 8.0\n.target sm_90\n.address_size 64\n\
        .visible .global .align 4 .u32 counter[4];\n\
        .visible .entry fill_u32(.param .u64 p, .param .u32 v, .param .u64 n) { ret; }\n\0";

    /// `zone_requests` seeds.
    pub fn zone_requests() -> Seeds {
        use Tok::*;
        let copy = Seq::default()
            .req(0, CuMemAllocV2::ID, &[Num(4096)])
            .write(0, 0, &[7; 64])
            .req(0, MemcpyHtoD::ID, &[Recent(0), Window(0, 64), Num(0)])
            .req(0, MemcpyDtoH::ID, &[Window(128, 64), Recent(1), Num(0)])
            .req(0, CuMemcpyDtoDV2::ID, &[Recent(1), Neighbour(0), Num(64)])
            .req(0, CuMemsetD8V2::ID, &[Neighbour(0), Num(1), Num(16)])
            .req(0, CuMemFreeV2::ID, &[Recent(1)])
            .req(0, CuMemFreeV2::ID, &[Neighbour(0)]);
        let mut ptx = Seq::default();
        for (i, chunk) in PTX.chunks(200).enumerate() {
            ptx = ptx.write(1, 4096 + 200 * i as u16, chunk);
        }
        // The allocation below: the simulated GPU places it after the neighbour.
        let mut params = Vec::new();
        params.extend_from_slice(&(0x7e00_0000_0000u64 + NEIGHBOUR).to_le_bytes());
        params.extend_from_slice(&[5, 0, 0, 0, 0, 0, 0, 0]);
        params.extend_from_slice(&16u64.to_le_bytes());
        let launch = ptx
            .req(1, CuMemAllocV2::ID, &[Num(4096)])
            .req(1, ModuleLoad::ID, &[Window(4096, PTX.len() as u16), Raw(&[0])])
            .req(1, CuModuleGetFunction::ID, &[Recent(0), Str("fill_u32")])
            .req(1, CuModuleGetGlobalV2::ID, &[Recent(1), Str("counter")])
            .req(1, CuStreamCreate::ID, &[Num(0)])
            // grid [1,1,1], block [16,1,1], no shared memory, no attributes.
            .req(1, Launch::ID, &[Recent(2), Raw(&[1, 1, 1, 16, 1, 1, 0, 0]), Recent(0), Raw(&[24]), Raw(&params)])
            .req(1, CuCtxSynchronize::ID, &[])
            .req(1, CuModuleUnload::ID, &[Recent(3)]);
        let contexts = Seq::default()
            .req(0, CtxCreate::ID, &[Num(0)])
            .req(0, CuMemAllocV2::ID, &[Num(8192)])
            .req(0, CuEventCreate::ID, &[Num(0)])
            .req(0, CtxDestroy::ID, &[Recent(2)])
            .req(0, CuMemAllocV2::ID, &[Num(7 << 20)])
            .end_session(0);
        let ipc = Seq::default()
            .req(0, CuMemAllocV2::ID, &[Num(4096)])
            .req(0, IpcGetMemHandle::ID, &[Recent(0)])
            .req(1, IpcOpenMemHandle::ID, &[IpcHandle, Num(1)])
            .req(2, IpcOpenMemHandle::ID, &[IpcHandle, Num(1)])
            .req(1, CuMemsetD32V2::ID, &[Recent(0), Num(9), Num(4)])
            .end_session(0)
            .req(1, CuMemsetD32V2::ID, &[Recent(0), Num(9), Num(4)])
            .req(1, IpcCloseMemHandle::ID, &[Recent(0)]);
        let g = 2u64 << 20;
        let vmm = Seq::default()
            .req(2, MemAddressReserve::ID, &[Num(4 * g), Num(0), Num(0)])
            .req(2, MemCreate::ID, &[Num(g), Num(0), Raw(&[0])])
            .req(2, MemMap::ID, &[Recent(1), Num(g), Num(0), Recent(0)])
            .req(2, MemSetAccess::ID, &[Recent(1), Num(g), Num(3)])
            .req(2, MemRelease::ID, &[Recent(0)])
            .req(2, MemUnmap::ID, &[Recent(1), Num(g)])
            .req(2, MemAddressFree::ID, &[Recent(1), Num(4 * g)]);
        let graph = Seq::default()
            .req(0, CuMemAllocV2::ID, &[Num(4096)])
            .req(0, CuGraphCreate::ID, &[Num(0)])
            .req(
                0,
                GraphAddMemsetNode::ID,
                &[Recent(0), Raw(&[0]), Recent(1), Num(4096), Num(1), Num(1), Num(4096), Num(1)],
            )
            .req(0, CuGraphInstantiateWithFlags::ID, &[Recent(1), Num(0)])
            .req(0, CuGraphLaunch::ID, &[Recent(0), Num(0)])
            .req(0, CuGraphExecDestroy::ID, &[Recent(0)])
            .req(0, CuGraphDestroy::ID, &[Recent(2)]);
        vec![
            ("seed-copy", copy.0),
            ("seed-launch", launch.0),
            ("seed-contexts", contexts.0),
            ("seed-ipc", ipc.0),
            ("seed-vmm", vmm.0),
            ("seed-graph", graph.0),
        ]
    }

    /// `module_image` seeds: PTX, a fat binary holding it, an ELF header.
    pub fn module_image() -> Seeds {
        let mut fatbin = crate::image::FATBIN_MAGIC.to_le_bytes().to_vec();
        fatbin.extend_from_slice(&1u16.to_le_bytes());
        fatbin.extend_from_slice(&16u16.to_le_bytes());
        fatbin.extend_from_slice(&(16 + PTX.len() as u64).to_le_bytes());
        fatbin.extend_from_slice(&1u16.to_le_bytes()); // kind: PTX
        fatbin.extend_from_slice(&0u16.to_le_bytes());
        fatbin.extend_from_slice(&16u32.to_le_bytes());
        fatbin.extend_from_slice(&(PTX.len() as u64).to_le_bytes());
        fatbin.extend_from_slice(PTX);
        let mut elf = crate::image::ELF_MAGIC.to_vec();
        elf.extend_from_slice(&[2, 1, 1, 0x33, 7]);
        elf.resize(64, 0);
        vec![("seed-ptx", PTX.to_vec()), ("seed-fatbin", fatbin), ("seed-elf", elf)]
    }

    /// `xen_offer` seeds: the well-formed offer of idm-xen's tests, and the largest allowed.
    pub fn xen_offer() -> Seeds {
        let layout = idm_shm::ChannelLayout::new(64 << 10, 1 << 20).unwrap();
        let npages = layout.total_size() / idm_xen::XEN_PAGE_SIZE;
        let good = format!("{}\n65536\n1048576\n{npages}\n1\n77\n9", idm_xen::channel::PROTOCOL_VERSION);
        let layout = idm_shm::ChannelLayout::new(1 << 20, 64 << 20).unwrap();
        let npages = layout.total_size() / idm_xen::XEN_PAGE_SIZE;
        let ndir = npages.div_ceil(idm_xen::channel::REFS_PER_DIR_PAGE);
        let refs: String = (0..ndir).map(|i| format!("{}\n", 100 + i)).collect();
        let big = format!("{}\n1048576\n67108864\n{npages}\n{ndir}\n{refs}3", idm_xen::channel::PROTOCOL_VERSION);
        vec![("seed-good", good.into_bytes()), ("seed-large", big.into_bytes())]
    }

    /// `xenstore_replies` seeds: a READ reply and a watch event.
    pub fn xenstore_replies() -> Seeds {
        let msg = xs_message;
        let mut read = vec![0u8];
        read.extend(msg(2, 1, b"4"));
        let mut event = vec![4u8];
        event.extend(msg(15, 0, b"@introduceDomain\0t\0"));
        event.extend(msg(16, 1, b"EACCES\0"));
        vec![("seed-read", read), ("seed-event", event)]
    }

    /// `broker_frames` seeds: an export, a permitted and a refused open, a revoke.
    pub fn broker_frames() -> Seeds {
        let frame = |who: u8, op: broker::Op| {
            let f = broker::encode_frame(&Request { seq: 1, op }).unwrap();
            let mut out = vec![who];
            out.extend_from_slice(&(f.len() as u16).to_le_bytes());
            out.extend(f);
            out
        };
        let mut token = [0u8; 16];
        token[0] = 1;
        let mut s = frame(0, broker::Op::Export { payload: vec![1; 64], size: 4096 });
        s.extend(frame(1, broker::Op::Open { token }));
        s.extend(frame(2, broker::Op::Open { token }));
        s.extend(frame(1, broker::Op::Close { token }));
        s.extend(frame(0, broker::Op::Revoke { token }));
        vec![("seed-ipc", s)]
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn corpus_dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
    }

    #[test]
    fn seeds_run_cleanly() {
        for t in super::TARGETS {
            for (_, bytes) in (t.seeds)() {
                (t.run)(&bytes);
            }
        }
    }

    /// The request seeds get past the checks: at least half their requests are answered (the
    /// rest are refusals they are there to provoke: another tenant's memory, a stranger's
    /// IPC open, use after the exporter ended).
    #[test]
    fn the_request_seeds_are_mostly_answered() {
        for (name, bytes) in super::seeds::zone_requests() {
            let (sent, answered) = super::zone_requests_answered(&bytes);
            assert!(sent > 0 && answered * 2 >= sent, "{name}: {answered} of {sent} answered");
        }
    }

    /// The offer seeds reach the checks behind a valid offer.
    #[test]
    fn the_offer_seeds_are_accepted() {
        for (name, bytes) in super::seeds::xen_offer() {
            assert!(super::xen_offer_accepted(&bytes), "{name}");
        }
    }

    /// Regenerate with `UPDATE_SEEDS=1 cargo test -p host-proxy --lib fuzz::`.
    #[test]
    #[cfg_attr(miri, ignore = "reads files, which Miri's isolation forbids")]
    fn committed_seeds_are_current() {
        let update = std::env::var_os("UPDATE_SEEDS").is_some();
        for t in super::TARGETS {
            let dir = corpus_dir(t.name);
            for (file, bytes) in (t.seeds)() {
                let path = dir.join(file);
                if update {
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(&path, &bytes).unwrap();
                }
                let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(committed, bytes, "{} is stale: UPDATE_SEEDS=1 regenerates it", path.display());
            }
        }
    }

    /// Each harness on deterministic mutations of its seeds: no coverage guidance (that is
    /// `cargo fuzz`'s), but every CI run reaches past the seeds. `VGPU_FUZZ_MUTATIONS`
    /// sets how many per target.
    #[test]
    #[cfg_attr(miri, ignore = "thousands of executions are too slow under Miri")]
    fn mutations_of_the_seeds_run_cleanly() {
        let n: u64 = std::env::var("VGPU_FUZZ_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1500);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for t in super::TARGETS {
            let seeds: Vec<Vec<u8>> = (t.seeds)().into_iter().map(|(_, b)| b).collect();
            for _ in 0..n {
                let mut input = seeds[next() as usize % seeds.len()].clone();
                for _ in 0..1 + next() % 4 {
                    let at = if input.is_empty() { 0 } else { next() as usize % input.len() };
                    match next() % 5 {
                        0 if !input.is_empty() => input[at] ^= 1 << (next() % 8),
                        1 if !input.is_empty() => input[at] = next() as u8,
                        2 => input.insert(at, next() as u8),
                        3 if !input.is_empty() => drop(input.remove(at)),
                        _ => {
                            // Splice: the tail of another seed.
                            let other = &seeds[next() as usize % seeds.len()];
                            let from = next() as usize % (other.len() + 1);
                            input.truncate(at);
                            input.extend_from_slice(&other[from..]);
                        }
                    }
                }
                (t.run)(&input);
            }
        }
    }

    /// Every committed input (seeds, inputs the fuzzer kept, `regression-*` from fixed
    /// crashes) runs cleanly.
    #[test]
    #[cfg_attr(miri, ignore = "reads files, which Miri's isolation forbids")]
    fn committed_corpus_replays() {
        for t in super::TARGETS {
            let dir = corpus_dir(t.name);
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            assert!(!files.is_empty(), "{}: empty corpus", dir.display());
            for f in files {
                eprintln!("{}: {}", t.name, f.display());
                (t.run)(&std::fs::read(&f).unwrap());
            }
        }
    }
}
