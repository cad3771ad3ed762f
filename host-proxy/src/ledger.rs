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

use idm_core::SharedMemory;
use idm_shm::MemfdRegion;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering::SeqCst;

/// Most sessions one zone may have (slots of one ledger).
pub const MAX_SLOTS: u32 = 64;
/// Bytes of one ledger: a 64-byte header, then one 64-byte line per slot.
pub const LEDGER_BYTES: usize = 64 * (1 + MAX_SLOTS as usize);
const MAGIC: u32 = 0x4c44_4756; // "VGDL" little-endian
const PAGE: u64 = 4096;
/// Offsets in a slot's line: what the session holds (checked against the quotas), then
/// what it has done (counters for the daemon's metrics, 64-bit, one atomic word each).
const MEM_PAGES: usize = 0;
const OBJECTS: usize = 4;
const REQUESTS: usize = 8;
const ERRORS: usize = 16;

fn line(slot: u32) -> usize {
    64 * (1 + slot as usize)
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
        Ledger { kind: Kind::Private, mine: Usage::default() }
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
        let ledger = Ledger { kind: Kind::Shared { region, slot }, mine: Usage::default() };
        ledger.store(Usage::default());
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
    /// any more. Returns the session's last request counters.
    pub fn release(&mut self, slot: u32) -> Counts {
        if slot < MAX_SLOTS && self.taken & (1 << slot) != 0 {
            let at = line(slot);
            let counts = self.counts_of(slot);
            self.region.raw().store_u32(at + MEM_PAGES, 0, SeqCst);
            self.region.raw().store_u32(at + OBJECTS, 0, SeqCst);
            self.region.raw().write_bytes(at + REQUESTS, &[0; 16]);
            self.taken &= !(1 << slot);
            return counts;
        }
        Counts::default()
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
        assert_eq!(z.release(s1), Counts { requests: 7, errors: 2 }, "a session's counters at its end");
        assert_eq!(z.counts(), Counts::default());
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
