//! The Xen side of the daemon: the toolstack part of the split-driver handshake.
//!
//! A thread with its own xenstore connection watches `@introduceDomain` and
//! `@releaseDomain`. For each guest domain it creates `xen_slots` device slots — the
//! frontend directory `/local/domain/D/device/vgpu/N` (owned by the guest, state
//! Initialising) and the backend directory `/local/domain/0/backend/vgpu/D/N` (owned by
//! dom0, readable by the guest, state InitWait) — and watches the frontends. When a
//! frontend (a libvgpu process in the guest) reaches Initialised, the daemon starts a
//! worker for that slot; the worker maps the guest's grants itself
//! ([`idm_xen::channel::backend_accept`]), so guest memory is mapped only in that zone's
//! process. When the worker ends, the slot is reset for the next process; when the domain
//! goes away, its workers are killed and its backend directory removed.
//!
//! See `idm_xen::channel` for the keys and the handshake's states.

use anyhow::{Context, Result};
use idm_xen::xenbus::{read_state, set_state};
use idm_xen::xenstore::XsTransport;
use idm_xen::{Access, Perm, XenStore, XenbusState, XsErrno, XsError};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::Duration;

/// What the toolstack asks of the daemon.
#[derive(Debug)]
pub enum ToDaemon {
    /// A frontend is Initialised: start a worker for it.
    Start {
        /// The guest domain.
        domid: u16,
        /// The slot.
        slot: u32,
        /// The domain's name (`/local/domain/D/name`).
        name: String,
    },
    /// The domain is gone: kill its workers.
    DomainGone {
        /// The guest domain.
        domid: u16,
    },
}

/// What the daemon tells the toolstack.
#[derive(Debug)]
pub enum ToToolstack {
    /// The worker of a slot ended: reset the slot.
    SlotDone {
        /// The guest domain.
        domid: u16,
        /// The slot.
        slot: u32,
        /// The worker failed (bad offer, protocol violation, crash): the slot is reset only
        /// after a back-off, so a guest cannot make dom0 spawn workers in a tight loop.
        failed: bool,
    },
}

/// The frontend directory of a slot.
pub fn frontend_dir(domid: u16, slot: u32) -> String {
    format!("/local/domain/{domid}/device/vgpu/{slot}")
}

/// The backend directory of a slot.
pub fn backend_dir(domid: u16, slot: u32) -> String {
    format!("/local/domain/0/backend/vgpu/{domid}/{slot}")
}

/// Whether this looks like dom0 with xenstore (for `xen = "auto"`).
pub fn available() -> bool {
    std::fs::read_to_string("/proc/xen/capabilities").is_ok_and(|c| c.contains("control_d"))
        && std::path::Path::new(idm_xen::GntDev::PATH).exists()
}

struct Domain {
    name: String,
    /// Slots with a running worker (or waiting out a back-off).
    busy: BTreeSet<u32>,
    /// Current back-off per slot after failed workers (doubles up to [`MAX_BACKOFF`]).
    backoff: BTreeMap<u32, Duration>,
}

/// First delay before a slot whose worker failed is offered again.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest such delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the toolstack has done, for the daemon's metrics.
#[derive(Debug, Default)]
pub struct XenCounters {
    offered: AtomicU64,
    claimed: AtomicU64,
    restarts: AtomicU64,
    backoffs: AtomicU64,
}

impl XenCounters {
    /// The counters now.
    pub fn now(&self) -> crate::metrics::XenNow {
        crate::metrics::XenNow {
            offered: self.offered.load(Relaxed),
            claimed: self.claimed.load(Relaxed),
            restarts: self.restarts.load(Relaxed),
            backoffs: self.backoffs.load(Relaxed),
        }
    }
}

/// The toolstack loop; runs on its own thread until the daemon goes away.
pub struct Toolstack<S = XsTransport> {
    counters: Arc<XenCounters>,
    xs: XenStore<S>,
    /// Slot resets waiting out a back-off: (when, domid, slot).
    delayed: Vec<(std::time::Instant, u16, u32)>,
    slots: u32,
    domains: BTreeMap<u16, Domain>,
    to_daemon: tokio::sync::mpsc::UnboundedSender<ToDaemon>,
    from_daemon: mpsc::Receiver<ToToolstack>,
}

impl Toolstack {
    /// Connects to xenstore and registers the domain watches.
    pub fn new(
        slots: u32,
        to_daemon: tokio::sync::mpsc::UnboundedSender<ToDaemon>,
        from_daemon: mpsc::Receiver<ToToolstack>,
    ) -> Result<Self> {
        let xs = XenStore::open().context("cannot reach xenstore")?;
        Toolstack::with_store(xs, slots, to_daemon, from_daemon)
    }
}

impl<S: Read + Write + AsFd> Toolstack<S> {
    /// The toolstack over an open xenstore connection (tests use a fake daemon).
    pub fn with_store(
        mut xs: XenStore<S>,
        slots: u32,
        to_daemon: tokio::sync::mpsc::UnboundedSender<ToDaemon>,
        from_daemon: mpsc::Receiver<ToToolstack>,
    ) -> Result<Self> {
        xs.watch("@introduceDomain", "introduce")?;
        xs.watch("@releaseDomain", "release")?;
        Ok(Toolstack {
            counters: Arc::default(),
            xs,
            delayed: Vec::new(),
            slots,
            domains: BTreeMap::new(),
            to_daemon,
            from_daemon,
        })
    }

    /// The toolstack's counters (shared with the daemon's metrics).
    pub fn counters(&self) -> Arc<XenCounters> {
        self.counters.clone()
    }

    /// Serves until the daemon drops its end.
    pub fn run(mut self) -> Result<()> {
        loop {
            if let Err(e) = self.scan() {
                tracing::warn!(error = %e, "xenstore scan failed");
            }
            loop {
                match self.from_daemon.try_recv() {
                    Ok(ToToolstack::SlotDone { domid, slot, failed }) => self.slot_done(domid, slot, failed),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            self.reset_due(std::time::Instant::now());
            // Watches wake us for domains and frontends; the timeout serves SlotDone.
            match self.xs.next_watch_event(Some(Duration::from_millis(200))) {
                Ok(_) => {}
                Err(e @ (XsError::Broken | XsError::Io { .. })) => return Err(e).context("xenstore connection lost"),
                Err(e) => tracing::debug!(error = %e, "watch wait"),
            }
        }
    }

    fn scan(&mut self) -> Result<(), XsError> {
        let mut live = BTreeSet::new();
        for entry in self.xs.directory("/local/domain")? {
            match entry.parse::<u16>() {
                Ok(0) | Err(_) => {}
                Ok(d) => {
                    live.insert(d);
                }
            }
        }
        let gone: Vec<u16> = self.domains.keys().filter(|d| !live.contains(d)).copied().collect();
        for domid in gone {
            self.domains.remove(&domid);
            tracing::info!(domid, "domain gone: stopping its zones");
            let _ = self.xs.unwatch(&format!("/local/domain/{domid}/device/vgpu"), &format!("front:{domid}"));
            let _ = self.xs.rm(&format!("/local/domain/0/backend/vgpu/{domid}"));
            let _ = self.to_daemon.send(ToDaemon::DomainGone { domid });
        }
        for domid in live {
            if !self.domains.contains_key(&domid) {
                // A domain being built may not have its name yet; the next event retries.
                let Some(name) = self.xs.read_string(&format!("/local/domain/{domid}/name"))? else { continue };
                match self.offer_slots(domid) {
                    Ok(()) => {
                        tracing::info!(domid, name = %name, slots = self.slots, "offering vgpu device slots");
                        self.domains.insert(domid, Domain { name, busy: BTreeSet::new(), backoff: BTreeMap::new() });
                    }
                    Err(e) => {
                        tracing::warn!(domid, error = %e, "cannot offer vgpu slots");
                        continue;
                    }
                }
            }
            self.start_ready(domid)?;
        }
        Ok(())
    }

    fn offer_slots(&mut self, domid: u16) -> Result<(), XsError> {
        let devices = format!("/local/domain/{domid}/device/vgpu");
        self.xs.mkdir(&devices)?;
        self.xs.set_perms(&devices, &[Perm { domid, access: Access::None }])?;
        for slot in 0..self.slots {
            self.write_slot(domid, slot)?;
        }
        self.xs.watch(&format!("/local/domain/{domid}/device/vgpu"), &format!("front:{domid}"))
    }

    /// Writes a fresh slot: frontend Initialising, backend InitWait, with permissions.
    fn write_slot(&mut self, domid: u16, slot: u32) -> Result<(), XsError> {
        let front = frontend_dir(domid, slot);
        let back = backend_dir(domid, slot);
        self.xs.transaction(8, |xs, tx| {
            let _ = xs.rm_tx(tx, &front);
            let _ = xs.rm_tx(tx, &back);
            xs.write_tx(tx, &format!("{front}/backend"), back.as_bytes())?;
            xs.write_tx(tx, &format!("{front}/backend-id"), b"0")?;
            xs.write_tx(tx, &format!("{front}/state"), XenbusState::Initialising.to_string().as_bytes())?;
            xs.write_tx(tx, &format!("{back}/frontend"), front.as_bytes())?;
            xs.write_tx(tx, &format!("{back}/frontend-id"), domid.to_string().as_bytes())?;
            xs.write_tx(tx, &format!("{back}/state"), XenbusState::InitWait.to_string().as_bytes())?;
            // The guest owns its frontend directory; dom0 owns the backend, the guest reads it.
            let guest_owns = [Perm { domid, access: Access::None }];
            for p in ["", "/backend", "/backend-id", "/state"] {
                xs.set_perms_tx(tx, &format!("{front}{p}"), &guest_owns)?;
            }
            let dom0_owns = [Perm { domid: 0, access: Access::None }, Perm { domid, access: Access::Read }];
            for p in ["", "/frontend", "/frontend-id", "/state"] {
                xs.set_perms_tx(tx, &format!("{back}{p}"), &dom0_owns)?;
            }
            Ok(())
        })?;
        self.counters.offered.fetch_add(1, Relaxed);
        Ok(())
    }

    fn start_ready(&mut self, domid: u16) -> Result<(), XsError> {
        let Some(dom) = self.domains.get_mut(&domid) else { return Ok(()) };
        for slot in 0..self.slots {
            if dom.busy.contains(&slot) {
                continue;
            }
            match read_state(&mut self.xs, &frontend_dir(domid, slot)) {
                Ok(Some(XenbusState::Initialised)) => {
                    dom.busy.insert(slot);
                    self.counters.claimed.fetch_add(1, Relaxed);
                    tracing::info!(domid, slot, "frontend initialised: starting a zone worker");
                    let _ = self.to_daemon.send(ToDaemon::Start { domid, slot, name: dom.name.clone() });
                }
                Ok(_) => {}
                Err(XsError::Daemon(XsErrno::NoEntry)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Resets the slots whose back-off has passed by `now`.
    fn reset_due(&mut self, now: std::time::Instant) {
        let due: Vec<(u16, u32)> = self.delayed.iter().filter(|(at, ..)| *at <= now).map(|&(_, d, s)| (d, s)).collect();
        self.delayed.retain(|(at, ..)| *at > now);
        for (domid, slot) in due {
            self.reset_slot(domid, slot);
        }
    }

    fn slot_done(&mut self, domid: u16, slot: u32, failed: bool) {
        let Some(dom) = self.domains.get_mut(&domid) else { return };
        if !failed {
            dom.backoff.remove(&slot);
            self.reset_slot(domid, slot);
            return;
        }
        let delay = dom.backoff.get(&slot).map_or(FIRST_BACKOFF, |d| (*d * 2).min(MAX_BACKOFF));
        dom.backoff.insert(slot, delay);
        self.counters.backoffs.fetch_add(1, Relaxed);
        tracing::warn!(
            domid,
            slot,
            delay_ms = delay.as_millis() as u64,
            "zone worker failed; slot offered again after a back-off"
        );
        // The slot stays busy (no new worker) until the delay has passed.
        self.delayed.push((std::time::Instant::now() + delay, domid, slot));
    }

    fn reset_slot(&mut self, domid: u16, slot: u32) {
        let Some(dom) = self.domains.get_mut(&domid) else { return };
        dom.busy.remove(&slot);
        self.counters.restarts.fetch_add(1, Relaxed);
        let _ = set_state(&mut self.xs, &backend_dir(domid, slot), XenbusState::Closed);
        if let Err(e) = self.write_slot(domid, slot) {
            tracing::warn!(domid, slot, error = %e, "cannot reset the slot");
        } else {
            tracing::debug!(domid, slot, "slot reset");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idm_xen::xenstore::fake::{connect, Fake};
    use std::time::Instant;

    fn toolstack() -> (Toolstack<std::os::unix::net::UnixStream>, tokio::sync::mpsc::UnboundedReceiver<ToDaemon>) {
        let mut fake = Fake::default();
        fake.nodes.insert("/local/domain/0/name".into(), b"Domain-0".to_vec());
        fake.nodes.insert("/local/domain/5/name".into(), b"guest".to_vec());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (_done_tx, done_rx) = mpsc::channel();
        (Toolstack::with_store(connect(fake), 2, tx, done_rx).unwrap(), rx)
    }

    fn read(t: &mut Toolstack<std::os::unix::net::UnixStream>, path: &str) -> Option<String> {
        t.xs.read_string(path).unwrap()
    }

    #[test]
    fn a_new_domain_gets_its_slots_with_the_right_owners() {
        let (mut t, _rx) = toolstack();
        t.scan().unwrap();
        for slot in 0..2 {
            let front = frontend_dir(5, slot);
            let back = backend_dir(5, slot);
            assert_eq!(read(&mut t, &format!("{front}/backend")), Some(back.clone()));
            assert_eq!(read(&mut t, &format!("{front}/state")).as_deref(), Some("1"));
            assert_eq!(read(&mut t, &format!("{back}/state")).as_deref(), Some("2"));
            assert_eq!(read(&mut t, &format!("{back}/frontend-id")).as_deref(), Some("5"));
            assert_eq!(t.xs.get_perms(&front).unwrap(), [Perm { domid: 5, access: Access::None }]);
            assert_eq!(
                t.xs.get_perms(&back).unwrap(),
                [Perm { domid: 0, access: Access::None }, Perm { domid: 5, access: Access::Read }]
            );
        }
        assert!(read(&mut t, &frontend_dir(0, 0)).is_none(), "dom0 gets no slots");
    }

    #[test]
    fn an_initialised_frontend_starts_one_worker_and_a_failing_one_backs_off() {
        let (mut t, mut rx) = toolstack();
        t.scan().unwrap();
        t.xs.write(&format!("{}/state", frontend_dir(5, 1)), b"3").unwrap();
        t.scan().unwrap();
        t.scan().unwrap();
        match rx.try_recv() {
            Ok(ToDaemon::Start { domid: 5, slot: 1, name }) => assert_eq!(name, "guest"),
            other => panic!("expected a start for slot 1, got {other:?}"),
        }
        assert!(rx.try_recv().is_err(), "one worker per slot");
        let c = t.counters().now();
        assert_eq!((c.offered, c.claimed, c.restarts, c.backoffs), (2, 1, 0, 0), "{c:?}");

        // The worker failed: no new worker before the back-off, the slot reset after it.
        // The back-off runs from slot_done's own clock reading, between t0 and t1.
        let t0 = Instant::now();
        t.slot_done(5, 1, true);
        let t1 = Instant::now();
        t.reset_due(t0);
        t.scan().unwrap();
        assert!(rx.try_recv().is_err(), "no restart during the back-off");
        assert_eq!(read(&mut t, &format!("{}/state", frontend_dir(5, 1))).as_deref(), Some("3"));
        t.reset_due(t1 + FIRST_BACKOFF);
        assert_eq!(read(&mut t, &format!("{}/state", frontend_dir(5, 1))).as_deref(), Some("1"));
        assert_eq!(read(&mut t, &format!("{}/state", backend_dir(5, 1))).as_deref(), Some("2"));

        // A second failure doubles the delay; a clean end resets at once and forgets it.
        t.xs.write(&format!("{}/state", frontend_dir(5, 1)), b"3").unwrap();
        t.scan().unwrap();
        assert!(matches!(rx.try_recv(), Ok(ToDaemon::Start { slot: 1, .. })));
        t.slot_done(5, 1, true);
        assert_eq!(t.domains[&5].backoff[&1], FIRST_BACKOFF * 2);
        t.reset_due(Instant::now() + MAX_BACKOFF);
        t.xs.write(&format!("{}/state", frontend_dir(5, 1)), b"3").unwrap();
        t.scan().unwrap();
        assert!(matches!(rx.try_recv(), Ok(ToDaemon::Start { slot: 1, .. })));
        t.slot_done(5, 1, false);
        assert!(!t.domains[&5].backoff.contains_key(&1));
        assert_eq!(read(&mut t, &format!("{}/state", frontend_dir(5, 1))).as_deref(), Some("1"));
        let c = t.counters().now();
        assert_eq!((c.offered, c.claimed, c.restarts, c.backoffs), (5, 3, 3, 2), "{c:?}");
    }

    #[test]
    fn a_vanished_domain_is_reported_and_its_backend_removed() {
        let (mut t, mut rx) = toolstack();
        t.scan().unwrap();
        t.xs.rm("/local/domain/5").unwrap();
        t.scan().unwrap();
        assert!(matches!(rx.try_recv(), Ok(ToDaemon::DomainGone { domid: 5 })));
        assert!(read(&mut t, &backend_dir(5, 0)).is_none());
        assert!(t.domains.is_empty());
    }
}
