//! The zone ledger: what all sessions of one zone hold, so that its quotas hold across
//! every process of the zone, not per worker.
//!
//! A zone may run several CUDA processes at once; each has its own session and worker
//! process. The daemon makes one small sealed memfd per zone (the *ledger*) and gives each
//! session's worker one *slot* of it: the worker publishes there what its session holds —
//! device memory charged to the zone (its allocations, its free cache, its physical VMM
//! memory, and the memory of its contexts) and its live objects. A quota is checked against
//! the sum over the zone's slots.
//!
//! **Admission without a lock.** Each slot has one writer, its worker. To grow, a worker
//! first *publishes* the value it would have (a sequentially consistent store), then reads
//! every slot (sequentially consistent loads) and, if the sum is over the quota, publishes
//! its old value again and refuses. Of two workers growing at once, the later store in the
//! single total order of such operations is followed by that worker's loads, which see
//! both stores: at least one of them sees the sum of both and at least one refuses, so the
//! sum of admitted values never exceeds the quota. (Both may refuse when only one would
//! fit: a tenant racing its own processes at its quota's edge may see one spurious
//! `CUDA_ERROR_OUT_OF_MEMORY`, never an overrun.) Shrinking is a plain publish. A worker
//! that dies mid-way leaves at most its own prospective value in its slot, which the daemon
//! clears when it has reaped the worker — and only then gives the slot to a new session.
//!
//! The ledger is host-side state shared only between the daemon and the zone's own
//! workers, never with a guest. Memory is published in 4 KiB pages (rounded up: a 32-bit
//! word holds 16 TiB), so the sum of *other* slots may over-count by less than a page each;
//! a worker's own value is exact in its check.
//!
//! **Statistics.** Below the slots' lines, each slot has a block of counters that only its
//! worker writes and the daemon reads for its metrics ([`Tally`]): per kind of request the
//! number handled and a histogram of their service time (fixed buckets, so memory does not
//! depend on what a guest sends), per CUDA error the requests answered with it, faults, and
//! the last error. A request costs its worker two or three 8-byte stores into its own block
//! (four more when it failed): no lock, no system call, no message to the daemon.

use idm_core::SharedMemory;
use idm_shm::MemfdRegion;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering::SeqCst;
use vgpu_proto::generated::{request_name, ERROR_NAMES, REQUEST_IDS};

/// Most sessions one zone may have (slots of one ledger).
pub const MAX_SLOTS: u32 = 64;
/// Kinds of request counted apart: every generated request, then one for the rest
/// (protocol messages and unknown ids).
pub const KINDS: usize = REQUEST_IDS.len() + 1;
/// Upper bounds of the service-time histogram's buckets, in nanoseconds (then `+Inf`).
pub const BUCKET_BOUNDS_NS: [u64; 12] =
    [1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 500_000, 1_000_000, 10_000_000, 100_000_000, 1_000_000_000];
/// Buckets of the histogram, `+Inf` included.
pub const BUCKETS: usize = BUCKET_BOUNDS_NS.len() + 1;
/// Errors counted apart: every code the driver names, then one for the rest.
pub const ERROR_KINDS: usize = ERROR_NAMES.len() + 1;
/// Words (u64) of one slot's statistics: per kind the sum of service times and its
/// buckets; per error a count; then faults, the last error and when it happened.
const KIND_WORDS: usize = 1 + BUCKETS;
const ERRORS_AT: usize = KINDS * KIND_WORDS;
const FAULTS_AT: usize = ERRORS_AT + ERROR_KINDS;
/// `code | kind << 32 | 1 << 63` (the top bit: there was one).
const LAST_ERROR_AT: usize = FAULTS_AT + 1;
/// When the last error happened, in microseconds since the epoch: fine enough that errors of
/// two sessions ordered in time are not tied when the zone's newest is picked.
const LAST_ERROR_US_AT: usize = LAST_ERROR_AT + 1;
const STATS_WORDS: usize = LAST_ERROR_US_AT + 1;
const STATS_BYTES: usize = (STATS_WORDS * 8).next_multiple_of(4096);
const STATS_BASE: usize = (64 * (1 + MAX_SLOTS as usize)).next_multiple_of(4096);
/// Bytes of one ledger: a 64-byte header, one 64-byte line per slot, then each slot's
/// statistics (a sparse memfd: pages no session touched take no memory).
pub const LEDGER_BYTES: usize = STATS_BASE + MAX_SLOTS as usize * STATS_BYTES;
const MAGIC: u32 = 0x4c44_4756; // "VGDL" little-endian
const PAGE: u64 = 4096;
/// Offsets in a slot's line: what the session holds (checked against the quotas), then
/// what it has done (counters for the daemon's metrics, 64-bit, one atomic word each).
const MEM_PAGES: usize = 0;
const OBJECTS: usize = 4;
const REQUESTS: usize = 8;
const ERRORS: usize = 16;
/// Of `MEM_PAGES`, what the session's contexts take (for the per-GPU metrics).
const CONTEXT_PAGES: usize = 24;

fn line(slot: u32) -> usize {
    64 * (1 + slot as usize)
}

fn stats_at(slot: u32) -> usize {
    STATS_BASE + slot as usize * STATS_BYTES
}

/// The kind (index) of request `id`.
fn kind_of(id: u16) -> usize {
    REQUEST_IDS.binary_search_by_key(&id, |m| m.0).unwrap_or(KINDS - 1)
}

/// The name of request kind `k` (the generated request's name).
pub fn kind_name(k: usize) -> &'static str {
    REQUEST_IDS.get(k).and_then(|id| request_name(*id)).unwrap_or("(other)")
}

/// The name of error kind `e` (the driver's `CUDA_ERROR_…` name).
pub fn error_kind_name(e: usize) -> &'static str {
    ERROR_NAMES.get(e).map_or("(other)", |n| n.1)
}

fn error_of(code: u32) -> usize {
    ERROR_NAMES.binary_search_by_key(&code, |e| e.0).unwrap_or(ERROR_KINDS - 1)
}

fn bucket_of(ns: u64) -> usize {
    BUCKET_BOUNDS_NS.iter().position(|b| ns <= *b).unwrap_or(BUCKETS - 1)
}

/// Whether `code` says a kernel faulted (the context is lost): illegal or misaligned
/// address, illegal instruction, invalid PC or address space, hardware stack error, device
/// assert, launch timeout or failure.
pub fn is_fault(code: u32) -> bool {
    matches!(code, 700 | 702 | 710 | 714 | 715 | 716 | 717 | 718 | 719)
}

/// Milliseconds since the Unix epoch now (as [`LastError::unix_ms`] counts).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Microseconds since the epoch (0 before it).
fn unix_us_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn pages(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(PAGE)).unwrap_or(u32::MAX)
}

/// What one session publishes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Device memory charged to the zone, in bytes.
    pub mem_bytes: u64,
    /// Live objects counted against `max_handles`.
    pub objects: u64,
}

/// A worker's view of its zone's ledger: its own slot, and every other slot to sum.
#[derive(Debug)]
pub struct Ledger {
    kind: Kind,
    /// Published in this session's slot (exact; the slot holds memory in pages).
    mine: Usage,
    /// Published as the memory of this session's contexts.
    context_bytes: u64,
    /// This session's statistics (the slot's block holds a copy).
    stats: Box<[u64]>,
    /// The last request was answered with a fault.
    faulted: bool,
}

#[derive(Debug)]
enum Kind {
    /// No daemon (tests, a zone on its own): the session is the whole zone.
    Private,
    /// The zone's shared ledger, slot `slot` of it.
    Shared { region: MemfdRegion, slot: u32 },
}

impl Ledger {
    /// A ledger of one session that is its zone's only one.
    pub fn private() -> Ledger {
        Ledger { kind: Kind::Private, mine: Usage::default(), context_bytes: 0, stats: zeroed(), faulted: false }
    }

    /// The zone's ledger received from the daemon, and this session's slot in it.
    pub fn shared(fd: OwnedFd, slot: u32) -> Result<Ledger, LedgerError> {
        if slot >= MAX_SLOTS {
            return Err(LedgerError::Slot(slot));
        }
        let region = MemfdRegion::from_fd(fd, LEDGER_BYTES).map_err(LedgerError::Map)?;
        if region.raw().load_u32(0, SeqCst) != MAGIC {
            return Err(LedgerError::Magic);
        }
        let ledger = Ledger {
            kind: Kind::Shared { region, slot },
            mine: Usage::default(),
            context_bytes: 0,
            stats: zeroed(),
            faulted: false,
        };
        ledger.store(Usage::default());
        region_zero_stats(&ledger);
        Ok(ledger)
    }

    /// What this session has published.
    pub fn mine(&self) -> Usage {
        self.mine
    }

    /// What the zone's *other* sessions hold (memory over-counted by less than a page each).
    pub fn others(&self) -> Usage {
        let Kind::Shared { region, slot } = &self.kind else { return Usage::default() };
        let raw = region.raw();
        let mut sum = Usage::default();
        for s in (0..MAX_SLOTS).filter(|s| s != slot) {
            let at = line(s);
            sum.mem_bytes = sum.mem_bytes.saturating_add(u64::from(raw.load_u32(at + MEM_PAGES, SeqCst)) * PAGE);
            sum.objects = sum.objects.saturating_add(u64::from(raw.load_u32(at + OBJECTS, SeqCst)));
        }
        sum
    }

    fn store(&self, u: Usage) {
        if let Kind::Shared { region, slot } = &self.kind {
            let at = line(*slot);
            region.raw().store_u32(at + MEM_PAGES, pages(u.mem_bytes), SeqCst);
            region.raw().store_u32(at + OBJECTS, u32::try_from(u.objects).unwrap_or(u32::MAX), SeqCst);
        }
    }

    /// Publishes this session's request counters (requests handled, requests answered
    /// with an error) for the daemon's metrics: two stores into this session's own line.
    pub fn count(&self, requests: u64, errors: u64) {
        if let Kind::Shared { region, slot } = &self.kind {
            let at = line(*slot);
            region.raw().write_bytes(at + REQUESTS, &requests.to_ne_bytes());
            region.raw().write_bytes(at + ERRORS, &errors.to_ne_bytes());
        }
    }

    /// Records one handled request: its id, how long it took to serve, and the CUDA error
    /// it was answered with. A few 8-byte stores into this session's own block.
    pub fn record(&mut self, id: u16, service_ns: u64, error: Option<u32>) {
        let k = kind_of(id);
        let at = k * KIND_WORDS;
        self.set(at, self.stats[at].saturating_add(service_ns));
        let b = at + 1 + bucket_of(service_ns);
        self.set(b, self.stats[b] + 1);
        let Some(code) = error else {
            self.faulted = false;
            return;
        };
        let e = ERRORS_AT + error_of(code);
        self.set(e, self.stats[e] + 1);
        let fault = is_fault(code);
        if fault && !self.faulted {
            self.set(FAULTS_AT, self.stats[FAULTS_AT] + 1);
        }
        self.faulted = fault;
        self.set(LAST_ERROR_AT, u64::from(code) | (k as u64) << 32 | 1 << 63);
        self.set(LAST_ERROR_US_AT, unix_us_now());
    }

    /// Publishes how much of this session's memory its contexts take (part of what
    /// [`Ledger::publish`] and [`Ledger::admit`] publish; for the metrics only).
    pub fn publish_contexts(&mut self, bytes: u64) {
        if bytes != self.context_bytes {
            self.context_bytes = bytes;
            if let Kind::Shared { region, slot } = &self.kind {
                region.raw().store_u32(line(*slot) + CONTEXT_PAGES, pages(bytes), SeqCst);
            }
        }
    }

    /// This session's statistics so far.
    pub fn tally(&self) -> Tally {
        Tally { counts: Counts::default(), words: self.stats.clone() }
    }

    fn set(&mut self, word: usize, v: u64) {
        self.stats[word] = v;
        if let Kind::Shared { region, slot } = &self.kind {
            region.raw().write_bytes(stats_at(*slot) + word * 8, &v.to_ne_bytes());
        }
    }

    /// Publishes `u` as this session's holding (shrinking, or the exact value after a
    /// request; growth goes through [`Ledger::admit`]).
    pub fn publish(&mut self, u: Usage) {
        if u != self.mine {
            self.mine = u;
            self.store(u);
        }
    }

    /// Grows this session's holding to `want` if the zone's total stays within `mem_quota`
    /// bytes and `max_objects` objects; otherwise leaves it as it was and says which quota
    /// would be exceeded.
    pub fn admit(&mut self, want: Usage, mem_quota: u64, max_objects: u64) -> Result<(), Exceeded> {
        let before = self.mine;
        self.mine = want;
        self.store(want);
        let others = self.others();
        let verdict = if others.mem_bytes.saturating_add(want.mem_bytes) > mem_quota {
            Err(Exceeded::Memory)
        } else if others.objects.saturating_add(want.objects) > max_objects {
            Err(Exceeded::Objects)
        } else {
            Ok(())
        };
        if verdict.is_err() {
            self.mine = before;
            self.store(before);
        }
        verdict
    }
}

fn zeroed() -> Box<[u64]> {
    vec![0; STATS_WORDS].into_boxed_slice()
}

/// A new session's block starts from zero (the daemon also clears it at release).
fn region_zero_stats(l: &Ledger) {
    if let Kind::Shared { region, slot } = &l.kind {
        region.raw().write_bytes(stats_at(*slot), &[0; STATS_WORDS * 8]);
    }
}

/// What sessions have done: request and error counts, and per kind of request, per error
/// and in faults the statistics of [`Ledger::record`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tally {
    /// Requests handled and answered with an error.
    pub counts: Counts,
    words: Box<[u64]>,
}

impl Default for Tally {
    fn default() -> Tally {
        Tally { counts: Counts::default(), words: zeroed() }
    }
}

/// One kind of request's service times.
#[derive(Clone, Debug, PartialEq)]
pub struct KindStats {
    /// The request's name.
    pub name: &'static str,
    /// Requests handled.
    pub count: u64,
    /// Their service time in all, in nanoseconds.
    pub sum_ns: u64,
    /// Requests per bucket of [`BUCKET_BOUNDS_NS`] (not cumulative; the last is `+Inf`).
    pub buckets: [u64; BUCKETS],
}

/// The last error a zone's sessions answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastError {
    /// The CUDA result code.
    pub code: u32,
    /// Its name (`CUDA_ERROR_…`), or `(other)`.
    pub name: &'static str,
    /// The request it answered.
    pub request: &'static str,
    /// When, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

impl Tally {
    /// Adds `other`'s statistics to these (the later last error is kept).
    pub fn add(&mut self, other: &Tally) {
        self.counts.requests = self.counts.requests.saturating_add(other.counts.requests);
        self.counts.errors = self.counts.errors.saturating_add(other.counts.errors);
        let later = other.words[LAST_ERROR_US_AT] >= self.words[LAST_ERROR_US_AT] && other.words[LAST_ERROR_AT] != 0;
        for (a, b) in self.words[..LAST_ERROR_AT].iter_mut().zip(&other.words[..LAST_ERROR_AT]) {
            *a = a.saturating_add(*b);
        }
        if later {
            self.words[LAST_ERROR_AT] = other.words[LAST_ERROR_AT];
            self.words[LAST_ERROR_US_AT] = other.words[LAST_ERROR_US_AT];
        }
    }

    /// The kinds of request handled at least once.
    pub fn kinds(&self) -> impl Iterator<Item = KindStats> + '_ {
        (0..KINDS).filter_map(|k| {
            let w = &self.words[k * KIND_WORDS..(k + 1) * KIND_WORDS];
            let mut buckets = [0; BUCKETS];
            buckets.copy_from_slice(&w[1..]);
            let count = buckets.iter().fold(0u64, |a, b| a.saturating_add(*b));
            (count > 0).then(|| KindStats { name: kind_name(k), count, sum_ns: w[0], buckets })
        })
    }

    /// Requests answered with each error, for the errors that happened.
    pub fn errors(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        (0..ERROR_KINDS).map(|e| (error_kind_name(e), self.words[ERRORS_AT + e])).filter(|(_, n)| *n > 0)
    }

    /// Faults: requests answered with a fault code ([`is_fault`]) after one that was not.
    pub fn faults(&self) -> u64 {
        self.words[FAULTS_AT]
    }

    /// The last error, if there was one.
    pub fn last_error(&self) -> Option<LastError> {
        let w = self.words[LAST_ERROR_AT];
        if w & 1 << 63 == 0 {
            return None;
        }
        let code = w as u32;
        let kind = ((w >> 32) & 0xffff) as usize;
        Some(LastError {
            code,
            name: vgpu_proto::generated::error_name(code).unwrap_or("(other)"),
            request: kind_name(kind),
            unix_ms: self.words[LAST_ERROR_US_AT] / 1000,
        })
    }
}

/// Which zone-wide quota a growth would exceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    /// `mem_bytes`.
    Memory,
    /// `max_handles`.
    Objects,
}

/// Why a worker cannot use the ledger it was given.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A slot number out of range.
    #[error("ledger slot {0} is out of range (at most {MAX_SLOTS} sessions)")]
    Slot(u32),
    /// The memfd is not a ledger of this size and seals.
    #[error("cannot map the zone ledger: {0}")]
    Map(idm_shm::ShmError),
    /// The memory holds no ledger.
    #[error("the zone ledger has no valid header")]
    Magic,
}

/// The daemon's side of one zone's ledger: the memfd and which slots are taken.
#[derive(Debug)]
pub struct ZoneLedger {
    region: MemfdRegion,
    taken: u64,
}

/// A zone's request counters over its sessions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests handled.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
}

impl ZoneLedger {
    /// A fresh ledger with every slot free.
    pub fn new(zone: &str) -> Result<ZoneLedger, idm_shm::ShmError> {
        let region = MemfdRegion::create(&format!("vgpu-ledger-{zone}"), LEDGER_BYTES)?;
        region.raw().store_u32(0, MAGIC, SeqCst);
        Ok(ZoneLedger { region, taken: 0 })
    }

    /// Takes a free slot among the first `limit` (the zone's `max_sessions`); `None` when
    /// all are taken.
    pub fn take(&mut self, limit: u32) -> Option<u32> {
        let slot = (0..limit.min(MAX_SLOTS)).find(|s| self.taken & (1 << s) == 0)?;
        self.taken |= 1 << slot;
        Some(slot)
    }

    /// Clears slot `slot` and frees it: its worker has been reaped, so nothing writes it
    /// any more. Returns the session's statistics.
    pub fn release(&mut self, slot: u32) -> Tally {
        if slot < MAX_SLOTS && self.taken & (1 << slot) != 0 {
            let at = line(slot);
            let tally = self.tally_of(slot);
            self.region.raw().store_u32(at + MEM_PAGES, 0, SeqCst);
            self.region.raw().store_u32(at + OBJECTS, 0, SeqCst);
            self.region.raw().store_u32(at + CONTEXT_PAGES, 0, SeqCst);
            self.region.raw().write_bytes(at + REQUESTS, &[0; 16]);
            self.region.raw().write_bytes(stats_at(slot), &[0; STATS_WORDS * 8]);
            self.taken &= !(1 << slot);
            return tally;
        }
        Tally::default()
    }

    fn tally_of(&self, slot: u32) -> Tally {
        let mut bytes = vec![0u8; STATS_WORDS * 8];
        self.region.raw().read_bytes(stats_at(slot), &mut bytes);
        let words = bytes.chunks_exact(8).map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes"))).collect();
        Tally { counts: self.counts_of(slot), words }
    }

    /// The statistics of the sessions holding a slot now.
    pub fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for s in (0..MAX_SLOTS).filter(|s| self.taken & (1 << s) != 0) {
            t.add(&self.tally_of(s));
        }
        t
    }

    fn counts_of(&self, slot: u32) -> Counts {
        let at = line(slot);
        let read = |off: usize| {
            let mut b = [0u8; 8];
            self.region.raw().read_bytes(at + off, &mut b);
            u64::from_ne_bytes(b)
        };
        Counts { requests: read(REQUESTS), errors: read(ERRORS) }
    }

    /// The request counters of the sessions holding a slot now.
    pub fn counts(&self) -> Counts {
        (0..MAX_SLOTS)
            .filter(|s| self.taken & (1 << s) != 0)
            .map(|s| self.counts_of(s))
            .fold(Counts::default(), |a, c| Counts { requests: a.requests + c.requests, errors: a.errors + c.errors })
    }

    /// Sessions holding a slot.
    pub fn sessions(&self) -> u32 {
        self.taken.count_ones()
    }

    /// What every session of the zone holds, as published.
    pub fn total(&self) -> Usage {
        let raw = self.region.raw();
        let mut sum = Usage::default();
        for s in 0..MAX_SLOTS {
            let at = line(s);
            sum.mem_bytes += u64::from(raw.load_u32(at + MEM_PAGES, SeqCst)) * PAGE;
            sum.objects += u64::from(raw.load_u32(at + OBJECTS, SeqCst));
        }
        sum
    }

    /// Of [`ZoneLedger::total`]'s memory, what the sessions' contexts take.
    pub fn context_bytes(&self) -> u64 {
        (0..MAX_SLOTS).map(|s| u64::from(self.region.raw().load_u32(line(s) + CONTEXT_PAGES, SeqCst)) * PAGE).sum()
    }

    /// The memfd, for a worker to inherit.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.region.fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(z: &ZoneLedger, slot: u32) -> Ledger {
        Ledger::shared(z.fd().try_clone_to_owned().unwrap(), slot).unwrap()
    }

    #[test]
    fn sessions_share_the_quota_and_a_released_slot_gives_it_back() {
        let mut z = ZoneLedger::new("t").unwrap();
        let (s0, s1) = (z.take(2).unwrap(), z.take(2).unwrap());
        assert_eq!(z.take(2), None, "max_sessions slots at most");
        let (mut a, mut b) = (worker(&z, s0), worker(&z, s1));
        let mib = 1 << 20;
        a.admit(Usage { mem_bytes: 3 * mib, objects: 1 }, 4 * mib, 10).unwrap();
        assert_eq!(b.admit(Usage { mem_bytes: 2 * mib, objects: 1 }, 4 * mib, 10), Err(Exceeded::Memory));
        assert_eq!(b.mine(), Usage::default(), "a refused growth leaves nothing behind");
        b.admit(Usage { mem_bytes: mib, objects: 9 }, 4 * mib, 10).unwrap();
        assert_eq!(b.admit(Usage { mem_bytes: mib, objects: 10 }, 4 * mib, 10), Err(Exceeded::Objects));
        assert_eq!(z.total(), Usage { mem_bytes: 4 * mib, objects: 10 });
        // a's worker dies holding its memory: the daemon clears the slot after reaping it.
        z.release(s0);
        assert_eq!(z.sessions(), 1);
        b.admit(Usage { mem_bytes: 4 * mib, objects: 9 }, 4 * mib, 10).unwrap();
        assert_eq!(z.take(2), Some(s0), "the freed slot is offered again");
        b.count(7, 2);
        assert_eq!(z.counts(), Counts { requests: 7, errors: 2 });
        assert_eq!(z.release(s1).counts, Counts { requests: 7, errors: 2 }, "a session's counters at its end");
        assert_eq!(z.counts(), Counts::default());
    }

    #[test]
    fn statistics_reach_the_daemon_and_add_up_over_sessions() {
        let mut z = ZoneLedger::new("s").unwrap();
        let (s0, s1) = (z.take(4).unwrap(), z.take(4).unwrap());
        let (mut a, mut b) = (worker(&z, s0), worker(&z, s1));
        let alloc = REQUEST_IDS[0].0;
        a.record(alloc, 1_500, None);
        a.record(alloc, 3_000_000_000, Some(2));
        b.record(alloc, 10, Some(700));
        b.record(alloc, 10, Some(700));
        b.record(0x0001, 10, None);
        b.record(alloc, 10, Some(700));
        a.publish_contexts(5 << 20);
        let t = z.tally();
        let kinds: Vec<KindStats> = t.kinds().collect();
        assert_eq!(kinds.len(), 2, "{kinds:?}");
        let k = &kinds[0];
        assert_eq!((k.name, k.count, k.sum_ns), (kind_name(0), 5, 3_000_001_530));
        assert_eq!((k.buckets[0], k.buckets[1], k.buckets[BUCKETS - 1]), (3, 1, 1), "{k:?}");
        assert_eq!(kinds[1].name, "(other)", "a protocol message counts as the rest");
        let errors: Vec<_> = t.errors().collect();
        assert_eq!(errors, [("CUDA_ERROR_OUT_OF_MEMORY", 1), ("CUDA_ERROR_ILLEGAL_ADDRESS", 3)]);
        assert_eq!(t.faults(), 2, "a fault after a fault is the same fault; after a success a new one");
        let last = t.last_error().unwrap();
        assert_eq!((last.code, last.name, last.request), (700, "CUDA_ERROR_ILLEGAL_ADDRESS", kind_name(0)));
        assert_eq!(z.context_bytes(), 5 << 20);
        let gone = z.release(s0);
        assert_eq!(gone.kinds().next().unwrap().count, 2, "a released slot's statistics go to the daemon");
        assert_eq!(z.context_bytes(), 0);
        let s2 = z.take(4).unwrap();
        assert_eq!(s2, s0);
        let c = worker(&z, s2);
        assert_eq!(c.tally().kinds().count(), 0);
        assert_eq!(z.tally().kinds().next().unwrap().count, 3, "a new session starts from zero");
        let mut sum = gone;
        sum.add(&z.tally());
        assert_eq!(sum.kinds().next().unwrap().count, 5);
        assert!(REQUEST_IDS.windows(2).all(|w| w[0].0 < w[1].0), "request ids are sorted (looked up by bisection)");
    }

    #[test]
    fn a_private_ledger_is_exact() {
        let mut l = Ledger::private();
        l.admit(Usage { mem_bytes: 1000, objects: 1 }, 1000, 1).unwrap();
        assert_eq!(l.admit(Usage { mem_bytes: 1001, objects: 1 }, 1000, 1), Err(Exceeded::Memory));
        l.publish(Usage::default());
        assert_eq!(l.mine(), Usage::default());
    }

    #[test]
    fn racing_sessions_never_overrun_the_quota() {
        let mut z = ZoneLedger::new("race").unwrap();
        let quota = 64u64 << 20;
        let chunk = 3u64 << 20;
        for _round in 0..20 {
            let slots: Vec<u32> = (0..8).map(|_| z.take(8).unwrap()).collect();
            let got: Vec<u64> = std::thread::scope(|s| {
                let handles: Vec<_> = slots
                    .iter()
                    .map(|&slot| {
                        let mut l = worker(&z, slot);
                        s.spawn(move || {
                            // Grow one chunk at a time until refused.
                            let mut held = 0;
                            while l.admit(Usage { mem_bytes: held + chunk, objects: 0 }, quota, 1).is_ok() {
                                held += chunk;
                            }
                            held
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let sum: u64 = got.iter().sum();
            assert!(sum <= quota, "admitted {sum} bytes under a {quota}-byte quota");
            assert_eq!(z.total().mem_bytes, sum, "what is published is what was admitted");
            for slot in slots {
                z.release(slot);
            }
            assert_eq!(z.total(), Usage::default());
        }
    }
}
