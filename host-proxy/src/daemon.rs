//! The control plane: accepts guests on the local transport, spawns and supervises one
//! worker process per zone, answers admin queries, shuts down cleanly.
//!
//! The daemon never maps guest memory itself: it identifies the peer (SO_PEERCRED), picks
//! the zone's quotas from the configuration, and hands the connected socket to a fresh
//! worker process as its standard input. The worker does the shared-memory handshake and
//! serves the zone. When the worker exits — the guest closed, died, or broke the protocol —
//! the zone is gone and the process's exit has released all its GPU memory.
//!
//! The daemon is also the CUDA IPC broker ([`crate::broker`]): each worker gets the other
//! end of a socket pair made at spawn (inherited as `--broker-fd`, so no guest can reach
//! it), and the daemon answers its export, open, revoke and close requests. When a worker
//! exits, every export it held is revoked (its importers are told) before the zone is
//! reported gone.

use crate::broker::{Broker, Peer};
use crate::config::{Config, Placement, XenMode};
use crate::events::{Events, Kind};
use crate::ledger::ZoneLedger;
use crate::metrics::{DaemonCounters, ZoneNow};
use crate::mps::MpsServers;
use crate::worker::{LedgerSlot, WorkerSpec};
use crate::xen::{ToDaemon, ToToolstack};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

/// A live zone, as the admin interface reports it.
#[derive(Clone, Debug)]
pub struct ZoneRecord {
    /// Zone name (from the configuration or the peer uid).
    pub name: String,
    /// Peer uid.
    pub uid: u32,
    /// Peer pid, where the kernel reports one.
    pub peer_pid: Option<i32>,
    /// The worker's pid.
    pub worker_pid: Option<u32>,
    /// When the session started.
    pub started: std::time::Instant,
    /// The zone's sharing mode (`isolated`, `mps`, `mig`).
    pub sharing: &'static str,
    /// The zone's memory quota.
    pub mem_quota: u64,
    /// The Xen domain id, for a Xen guest's session.
    pub domid: Option<u16>,
}

type Zones = Arc<Mutex<BTreeMap<u32, ZoneRecord>>>;

/// What every session start and end needs of the daemon: its configuration and executable,
/// the live sessions, the IPC broker, the zone ledgers and the MPS servers. Cheap to clone.
#[derive(Clone)]
struct Plane {
    config: Arc<Config>,
    exe: PathBuf,
    zones: Zones,
    broker: Arc<Broker>,
    ledgers: Ledgers,
    mps: MpsServers,
    counters: Arc<DaemonCounters>,
    /// The Xen toolstack's counters, when Xen guests are served.
    xen: Option<Arc<crate::xen::XenCounters>>,
    /// The GPU through NVML, where it can be opened (for the metrics).
    nvml: Option<Arc<crate::nvml::Nvml>>,
    /// Requests per second per zone, sampled each second.
    rates: Arc<Mutex<BTreeMap<String, Rate>>>,
    /// The per-zone event log (`host-proxy events`).
    events: Arc<Events>,
    /// Faults already reported as events, by zone.
    faults_seen: Arc<Mutex<BTreeMap<String, u64>>>,
}

/// A zone's request rate: the last sample (total requests and when) and the rate then.
#[derive(Clone, Copy, Debug)]
struct Rate {
    total: u64,
    at: std::time::Instant,
    per_s: f64,
}

/// How often the request rates of `host-proxy status` are sampled.
const RATE_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The admin socket path that goes with a listening socket.
pub fn admin_socket_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".admin");
    PathBuf::from(p)
}

/// The lock file that goes with a listening socket: the daemon serving the socket holds its
/// lock for as long as it runs.
pub fn lock_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// Claims `socket` (and its admin socket) for this daemon: takes the exclusive `flock` of
/// its lock file, or refuses when another daemon holds it. The kernel drops the lock when
/// its holder ends, however it ends, so a killed daemon leaves nothing in the next one's
/// way but socket files, which [`bind`] then removes. Asking for the lock, unlike
/// connecting to the socket to see whether anyone answers, does nothing to a running
/// daemon (a connection would start a session there) and has no window between two
/// daemons starting at once. The returned file holds the lock; keep it open.
fn claim(socket: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create socket directory {}", dir.display()))?;
    }
    let path = lock_path(socket);
    // Never removed: a daemon that removed it could leave the next one locking a file that
    // a third one no longer sees.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    if !try_lock_exclusive(&file).with_context(|| format!("cannot lock {}", path.display()))? {
        anyhow::bail!(
            "another host-proxy is already listening on {} (it holds {}); stop it first",
            socket.display(),
            path.display()
        );
    }
    Ok(file)
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another process holds the lock.
#[allow(unsafe_code)]
fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    // SAFETY: a plain system call on a descriptor `file` owns and keeps open across it; no
    // memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

/// Listens on `path`, which this daemon has claimed ([`claim`]): a socket there was left by
/// a daemon that is gone (killed, say), and is removed; anything else there is not ours to
/// remove.
fn bind(path: &Path) -> Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
            tracing::info!(socket = %path.display(), "removed a socket left by a daemon that is gone");
        }
        Ok(_) => anyhow::bail!("{} exists and is not a socket: choose another socket path", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot look at {}", path.display())),
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}

/// Runs the daemon until SIGINT or SIGTERM. `pci` is the GPU's PCI bus id, as the start-up
/// probe found it (`None`: the simulated GPU, or unknown).
pub async fn run(config: Config, exe: PathBuf, pci: Option<String>) -> Result<()> {
    // Held until the daemon ends: dropping it (or the daemon's death) releases the lock.
    let _claim = claim(&config.socket)?;
    let listener = bind(&config.socket)?;
    let admin_path = admin_socket_path(&config.socket);
    let admin = bind(&admin_path)?;
    tracing::info!(socket = %config.socket.display(), backend = ?config.backend, "host-proxy listening");
    let zones: Zones = Arc::default();
    let broker = Broker::new();
    let ledgers = Ledgers::default();
    let mps_dir = config.mps_dir.clone().unwrap_or_else(|| {
        let mut d = config.socket.as_os_str().to_owned();
        d.push(".mps");
        PathBuf::from(d)
    });
    let mps = MpsServers::new(config.mps_control.clone(), mps_dir);
    let config = Arc::new(config);
    let nvml = pci.and_then(|pci| match crate::nvml::Nvml::open(&pci) {
        Ok(n) => Some(Arc::new(n)),
        Err(why) => {
            tracing::info!(%why, "the metrics leave out the driver's memory figures");
            None
        }
    });
    let (xen_tx, mut xen_rx) = tokio::sync::mpsc::unbounded_channel();
    let (mut xen, xen_counters) = match start_toolstack(&config, xen_tx)? {
        Some((side, counters)) => (Some(side), Some(counters)),
        None => (None, None),
    };
    let plane = Plane {
        config: config.clone(),
        exe,
        zones: zones.clone(),
        broker: broker.clone(),
        ledgers: ledgers.clone(),
        mps: mps.clone(),
        counters: Arc::default(),
        xen: xen_counters,
        nvml,
        rates: Arc::default(),
        events: Arc::default(),
        faults_seen: Arc::default(),
    };
    if let Some(addr) = config.metrics_listen {
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
        let plane = plane.clone();
        // Scrapers are few: more connections at once than this are closed at once, so that
        // a flood of them cannot take the descriptors guests' connections need.
        let slots = Arc::new(tokio::sync::Semaphore::new(crate::metrics::MAX_SCRAPES));
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors, say: wait instead of spinning on the error.
                        tracing::warn!(error = %e, "metrics accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
                let plane = plane.clone();
                tokio::spawn(async move {
                    let _ = crate::metrics::answer(stream, || scrape(&plane)).await;
                    drop(permit);
                });
            }
        });
    }
    let mut next_zone = 1u32;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(RATE_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            Some(msg) = xen_rx.recv() => if let Some(x) = xen.as_mut() {
                match msg {
                    ToDaemon::Start { domid, slot, name } => {
                        let id = next_zone;
                        next_zone = next_zone.wrapping_add(1).max(1);
                        if let Err(e) = start_xen_zone(&plane, id, domid, slot, &name, x) {
                            tracing::warn!(zone = id, domid, slot, error = %format!("{e:#}"), "could not start zone");
                            let _ = x.done.send(ToToolstack::SlotDone { domid, slot, failed: true });
                        }
                    }
                    ToDaemon::DomainGone { domid } => {
                        for kill in x.kills.lock().unwrap_or_else(|p| p.into_inner()).remove(&domid).unwrap_or_default() {
                            kill.notify_one();
                        }
                    }
                }
            },
            conn = listener.accept() => match conn {
                Ok((stream, _)) => {
                    let id = next_zone;
                    next_zone = next_zone.wrapping_add(1).max(1);
                    if let Err(e) = start_zone(&plane, id, stream) {
                        tracing::warn!(zone = id, error = %format!("{e:#}"), "could not start zone");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            conn = admin.accept() => if let Ok((stream, _)) = conn {
                let plane = plane.clone();
                tokio::spawn(async move { let _ = report(stream, &plane).await; });
            },
            _ = tick.tick() => {
                sample_rates(&plane);
                note_ipc_refusals(&plane);
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    tracing::info!("shutting down: stopping all zone workers");
    // An MPS control daemon quits once its clients are gone: the workers go first.
    if mps.running() {
        kill_workers(&zones);
        mps.stop_all().await;
    }
    // Workers are spawned with kill_on_drop; dropping their supervising tasks with the
    // runtime kills them. Remove our sockets so the next start is clean.
    let _ = std::fs::remove_file(&config.socket);
    let _ = std::fs::remove_file(&admin_path);
    Ok(())
}

/// The daemon's end of the Xen toolstack thread.
struct XenSide {
    done: std::sync::mpsc::Sender<ToToolstack>,
    /// Per guest domain, the kill switches of its workers.
    kills: Arc<Mutex<BTreeMap<u16, Vec<Arc<tokio::sync::Notify>>>>>,
}

fn start_toolstack(
    config: &Config,
    tx: tokio::sync::mpsc::UnboundedSender<ToDaemon>,
) -> Result<Option<(XenSide, Arc<crate::xen::XenCounters>)>> {
    let wanted = match config.xen {
        XenMode::Off => false,
        XenMode::On => true,
        XenMode::Auto => crate::xen::available(),
    };
    if !wanted {
        return Ok(None);
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let toolstack = crate::xen::Toolstack::new(config.xen_slots, tx, done_rx).context("cannot serve Xen guests")?;
    let counters = toolstack.counters();
    std::thread::Builder::new().name("xen-toolstack".into()).spawn(move || {
        if let Err(e) = toolstack.run() {
            tracing::error!(error = %format!("{e:#}"), "the Xen toolstack thread stopped");
        }
    })?;
    tracing::info!(slots = config.xen_slots, "serving Xen guests (xenstore device vgpu)");
    Ok(Some((XenSide { done: done_tx, kills: Arc::default() }, counters)))
}

/// The admin report: one line per live session, `key=value` fields (the zone's totals from
/// its ledger on each of its sessions' lines), then the event log (`event {json}`, oldest
/// first), then `end`. `host-proxy status` and `host-proxy events` read it.
async fn report(mut stream: UnixStream, plane: &Plane) -> std::io::Result<()> {
    let snapshot = plane.ledgers.snapshot();
    let rates = plane.rates.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let text = {
        let zones = plane.zones.lock().unwrap_or_else(|p| p.into_inner());
        let mut t = String::new();
        for (id, z) in zones.iter() {
            let (sessions, used, live, _) = snapshot.get(&z.name).cloned().unwrap_or_default();
            let tally = plane.counters.total(&z.name, &live);
            let rps = rates.get(&z.name).map_or(0.0, |r| r.per_s);
            let last_error = tally.last_error().map_or("-".to_owned(), |e| {
                let ago = crate::ledger::unix_ms_now().saturating_sub(e.unix_ms) / 1000;
                format!("{}/{}/{ago}", e.name, e.request)
            });
            t.push_str(&format!(
                "zone {id} name={} uid={} peer_pid={} worker_pid={} domid={} sharing={} uptime_s={} zone_sessions={} zone_mem_used={} zone_objects={} mem_quota={} requests={} errors={} rps={rps:.1} last_error={last_error}\n",
                z.name,
                z.uid,
                z.peer_pid.map_or("-".into(), |p| p.to_string()),
                z.worker_pid.map_or("-".into(), |p| p.to_string()),
                z.domid.map_or("-".into(), |d| d.to_string()),
                z.sharing,
                z.started.elapsed().as_secs(),
                sessions,
                used.mem_bytes,
                used.objects,
                z.mem_quota,
                tally.counts.requests,
                tally.counts.errors,
            ));
        }
        for e in plane.events.recent() {
            t.push_str("event ");
            t.push_str(&serde_json::to_string(&e).expect("plain data serialises"));
            t.push('\n');
        }
        t.push_str("end\n");
        t
    };
    stream.write_all(text.as_bytes()).await
}

/// Records zone `name`'s new faults (its statistics, ended sessions included, against what
/// was reported before) as one event naming the last error.
fn note_faults(plane: &Plane, name: &str, live: &crate::ledger::Tally) {
    let total = plane.counters.total(name, live);
    let faults = total.faults();
    let new = {
        let mut seen = plane.faults_seen.lock().unwrap_or_else(|p| p.into_inner());
        let before = seen.entry(name.to_owned()).or_default();
        let new = faults.saturating_sub(*before);
        *before = (*before).max(faults);
        new
    };
    if new > 0 {
        let last = total.last_error().map_or_else(String::new, |e| format!(": last {} from {}", e.name, e.request));
        plane.events.push(name, Kind::Fault, None, format!("{new} new fault(s), {faults} in all{last}"));
    }
}

/// Takes the broker's refused CUDA IPC opens into the event log.
fn note_ipc_refusals(plane: &Plane) {
    for r in plane.broker.registry().take_refusals() {
        plane.events.push(
            &r.zone,
            Kind::IpcRefused,
            Some(r.conn),
            format!("CUDA IPC open of an export of zone {:?} refused: no sharing group in common (CUDA_ERROR_NOT_PERMITTED)", r.exporter),
        );
    }
}

/// Makes a child die with the daemon: should the daemon be killed (or crash) without
/// stopping its children, the kernel sends each `signal` — SIGKILL for workers, so no worker
/// of a dead daemon keeps holding GPU memory and every guest sees its peer gone; SIGTERM for
/// an MPS control daemon, the signal that lets it stop its server. The daemon's children are
/// spawned from its one runtime thread, whose exit is the daemon's.
#[allow(unsafe_code)]
pub(crate) fn die_with_daemon(cmd: &mut tokio::process::Command, signal: libc::c_int) {
    let daemon = std::process::id();
    let arm = move || {
        // SAFETY: `prctl(PR_SET_PDEATHSIG)` and `getppid` are async-signal-safe and touch only
        // the child's own state, as code between fork and exec must.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        let parent = unsafe { libc::getppid() };
        // The daemon died between the fork and the prctl: do not start an orphan.
        if u32::try_from(parent).ok() != Some(daemon) {
            return Err(std::io::Error::other("the daemon is gone"));
        }
        Ok(())
    };
    // SAFETY: the closure calls only async-signal-safe functions and allocates nothing on
    // its success path, which is safe in the forked child.
    unsafe {
        cmd.pre_exec(arm);
    }
}

/// Samples each zone's requests per second (for `host-proxy status`).
fn sample_rates(plane: &Plane) {
    let now = std::time::Instant::now();
    let snapshot = plane.ledgers.snapshot();
    let mut rates = plane.rates.lock().unwrap_or_else(|p| p.into_inner());
    rates.retain(|name, _| snapshot.contains_key(name));
    for (name, (_, _, live, _)) in &snapshot {
        note_faults(plane, name, live);
        let total = plane.counters.total(name, live).counts.requests;
        let r = rates.entry(name.clone()).or_insert(Rate { total, at: now, per_s: 0.0 });
        let dt = now.duration_since(r.at).as_secs_f64();
        if dt > 0.0 {
            *r = Rate { total, at: now, per_s: total.saturating_sub(r.total) as f64 / dt };
        }
    }
}

/// The metrics text of a scrape ([`crate::metrics`]).
fn scrape(plane: &Plane) -> String {
    let quotas: BTreeMap<String, u64> = {
        let zones = plane.zones.lock().unwrap_or_else(|p| p.into_inner());
        zones.values().map(|z| (z.name.clone(), z.mem_quota)).collect()
    };
    let zones = plane
        .ledgers
        .snapshot()
        .into_iter()
        .map(|(name, (sessions, used, tally, context_bytes))| {
            let mem_quota = quotas.get(&name).copied().unwrap_or(0);
            let z =
                ZoneNow { sessions, mem_used: used.mem_bytes, mem_quota, objects: used.objects, context_bytes, tally };
            (name, z)
        })
        .collect();
    let plant = crate::metrics::Plant {
        opens: plane.broker.registry().open_counts(),
        mps: plane.mps.count(),
        gpu: crate::metrics::GpuNow {
            device: plane.config.device,
            driver: plane.nvml.as_ref().and_then(|n| n.memory()),
        },
        xen: plane.xen.as_ref().map(|x| x.now()),
    };
    crate::metrics::render(&zones, &plane.counters, &plant)
}

/// Kills every live worker (at shutdown, before the MPS servers are stopped).
#[allow(unsafe_code)]
fn kill_workers(zones: &Zones) {
    let pids: Vec<u32> =
        zones.lock().unwrap_or_else(|p| p.into_inner()).values().filter_map(|z| z.worker_pid).collect();
    for pid in pids {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: plain system call on a pid of our own unreaped child (its record goes
            // when it is reaped); no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Lets the worker inherit `fd` (its end of the broker socket pair) across `exec`.
#[allow(unsafe_code)]
fn inherit_across_exec(cmd: &mut tokio::process::Command, fd: RawFd) {
    let keep = move || {
        // SAFETY: `fcntl(F_SETFD)` is async-signal-safe, as code between fork and exec must
        // be; it changes only the child's copy of the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: the closure only calls `fcntl` on a descriptor number it copied (no
    // allocation, no locks), which is safe to run in the forked child.
    unsafe {
        cmd.pre_exec(keep);
    }
}

fn start_zone(plane: &Plane, id: u32, stream: UnixStream) -> Result<()> {
    let config = &plane.config;
    let cred = stream.peer_cred().context("cannot read the peer's credentials")?;
    let Some((name, quotas)) = config.zone_for_uid(cred.uid()) else {
        tracing::warn!(uid = cred.uid(), "refusing peer: its uid matches no [[zone]] and allow_unlisted = false");
        return Ok(());
    };
    let std_stream = stream.into_std().context("cannot take the connection")?;
    std_stream.set_nonblocking(false)?;
    let fd: OwnedFd = std_stream.into();
    let mut launch = worker_command(plane, id, &name, &quotas, None)?;
    launch.cmd.stdin(Stdio::from(fd));
    let peer = Peer { conn: id, zone: name.clone(), uid: cred.uid(), groups: config.groups_of(&name) };
    let Spawned { mut child, slot, mps_ended } = spawn_worker(plane, launch, peer, cred.pid(), None)?;
    tracing::info!(zone = id, name = %name, uid = cred.uid(), peer_pid = ?cred.pid(), worker_pid = ?child.id(), slot = ?slot.as_ref().map(|s| s.1), sharing = ?config.placement_of(&name), "zone started");
    // A session without a ledger slot was refused by max_sessions (an event already).
    if slot.is_some() {
        let pid = cred.pid().map_or("?".to_owned(), |p| p.to_string());
        let worker = child.id().map_or("?".to_owned(), |p| p.to_string());
        plane.events.push(
            &name,
            Kind::SessionStarted,
            Some(id),
            format!("uid {} pid {pid}, worker pid {worker}", cred.uid()),
        );
    }
    let plane = plane.clone();
    tokio::spawn(async move {
        let (status, why) = supervise(id, &mut child, mps_ended, None).await;
        zone_ended(&plane, id, status, why, slot).await;
    });
    Ok(())
}

/// After a worker exits: its exports die with it (importers are told) before the zone is
/// reported gone, and its ledger slot (what it held, as published) is cleared and freed.
/// `why` is the daemon's reason when it ended the session itself.
async fn zone_ended(
    plane: &Plane,
    id: u32,
    status: std::io::Result<std::process::ExitStatus>,
    why: Option<Kind>,
    slot: Option<(String, u32)>,
) {
    plane.broker.detach(id).await;
    let name = plane.zones.lock().unwrap_or_else(|p| p.into_inner()).get(&id).map(|z| z.name.clone());
    let mut tally = crate::ledger::Tally::default();
    if let Some((name, slot)) = &slot {
        tally = plane.ledgers.release(name, *slot);
        // A worker that refused its session itself (its context did not fit) says so.
        if matches!(&status, Ok(s) if s.code() == Some(crate::worker::REFUSED_EXIT)) {
            plane.counters.refused(name, "memory");
        }
    }
    plane.counters.ended(name.as_deref().unwrap_or("?"), &tally);
    plane.zones.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    if let Some(name) = &name {
        let live = plane.ledgers.snapshot().remove(name).map(|z| z.2).unwrap_or_default();
        note_faults(plane, name, &live);
        let refused = matches!(&status, Ok(s) if s.code() == Some(crate::worker::REFUSED_EXIT));
        let did = format!("after {} requests ({} errors)", tally.counts.requests, tally.counts.errors);
        let event = match (&status, why) {
            (_, Some(Kind::DomainGone)) => {
                Some((Kind::DomainGone, format!("the guest domain is gone: its worker was killed {did}")))
            }
            (_, Some(kind)) => Some((kind, format!("its MPS group's server is gone: the session was ended {did}"))),
            // Without a slot: refused by max_sessions, an event already.
            _ if refused && slot.is_none() => None,
            _ if refused => {
                Some((Kind::SessionRefused, "memory: its context does not fit the zone's memory quota".into()))
            }
            (Ok(s), None) if s.success() => Some((Kind::SessionEnded, format!("the guest disconnected {did}"))),
            (Ok(s), None) => Some((
                Kind::SessionFailed,
                format!("the worker ended abnormally ({s}) {did}; its resources are released"),
            )),
            (Err(e), None) => Some((Kind::SessionFailed, format!("lost track of the worker: {e}"))),
        };
        if let Some((kind, detail)) = event {
            plane.events.push(name, kind, Some(id), detail);
        }
    }
    match status {
        Ok(s) if s.success() => tracing::info!(zone = id, "zone ended: guest disconnected"),
        Ok(s) => tracing::warn!(zone = id, status = %s, "zone ended abnormally; its resources are released"),
        Err(e) => tracing::error!(zone = id, error = %e, "lost track of zone worker"),
    }
}

/// A Xen guest's slot reached Initialised: a worker maps its grants and serves it.
fn start_xen_zone(plane: &Plane, id: u32, domid: u16, slot: u32, domain: &str, xen: &XenSide) -> Result<()> {
    let config = &plane.config;
    let Some((name, quotas)) = config.zone_for_domain(domain) else {
        tracing::warn!(domid, domain, "refusing guest: its name matches no [[zone]] and allow_unlisted = false");
        return Ok(());
    };
    let mut launch = worker_command(plane, id, &name, &quotas, Some(crate::worker::XenSlot { domid, slot }))?;
    launch.cmd.stdin(Stdio::null());
    let peer = Peer { conn: id, zone: name.clone(), uid: 0, groups: config.groups_of(&name) };
    let Spawned { mut child, slot: ledger_slot, mps_ended } = spawn_worker(plane, launch, peer, None, Some(domid))?;
    tracing::info!(zone = id, name = %name, domid, slot, worker_pid = ?child.id(), "zone started (Xen guest)");
    if ledger_slot.is_some() {
        let worker = child.id().map_or("?".to_owned(), |p| p.to_string());
        let detail = format!("Xen domain {domain:?} (domid {domid}, slot {slot}), worker pid {worker}");
        plane.events.push(&name, Kind::SessionStarted, Some(id), detail);
    }
    let kill = Arc::new(tokio::sync::Notify::new());
    xen.kills.lock().unwrap_or_else(|p| p.into_inner()).entry(domid).or_default().push(kill.clone());
    let (plane, done, kills) = (plane.clone(), xen.done.clone(), xen.kills.clone());
    tokio::spawn(async move {
        let (status, why) = supervise(id, &mut child, mps_ended, Some((domid, kill.clone()))).await;
        if let Some(list) = kills.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&domid) {
            list.retain(|k| !Arc::ptr_eq(k, &kill));
        }
        let failed = !matches!(&status, Ok(s) if s.success());
        zone_ended(&plane, id, status, why, ledger_slot).await;
        let _ = done.send(ToToolstack::SlotDone { domid, slot, failed });
    });
    Ok(())
}

/// The IPC broker socket pair of a worker: (the daemon's end, the worker's end).
type BrokerPair = (std::os::unix::net::UnixStream, std::os::unix::net::UnixStream);

/// Spawns a zone worker and registers it: its broker channel, its admin record. Returns it
/// and its ledger slot (released again if it could not be spawned).
fn spawn_worker(
    plane: &Plane,
    launch: Launch,
    peer: Peer,
    peer_pid: Option<i32>,
    domid: Option<u16>,
) -> Result<Spawned> {
    let (exe, zones, broker, ledgers) = (&plane.exe, &plane.zones, &plane.broker, &plane.ledgers);
    plane.counters.started();
    // The worker inherits the ledger's descriptor at spawn; the daemon's copy of it is
    // dropped after that.
    let Launch { mut cmd, pair: (ours, theirs), slot, mps_ended, mem_quota: launch_quota } = launch;
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            if let Some((name, slot, _)) = &slot {
                ledgers.release(name, *slot);
            }
            return Err(e).with_context(|| format!("cannot spawn worker {}", exe.display()));
        }
    };
    // Only the worker holds its end now: when it exits, the channel closes.
    drop(theirs);
    let slot = slot.map(|(name, slot, _fd)| (name, slot));
    ours.set_nonblocking(true)?;
    let ours = UnixStream::from_std(ours).context("cannot serve the IPC broker channel")?;
    let sharing = match plane.config.placement_of(&peer.zone) {
        Placement::Isolated => "isolated",
        Placement::Mps { .. } => "mps",
        Placement::Mig { .. } => "mig",
    };
    let record = ZoneRecord {
        name: peer.zone.clone(),
        uid: peer.uid,
        peer_pid,
        worker_pid: child.id(),
        started: std::time::Instant::now(),
        sharing,
        mem_quota: launch_quota,
        domid,
    };
    zones.lock().unwrap_or_else(|p| p.into_inner()).insert(peer.conn, record);
    broker.attach(peer, ours);
    Ok(Spawned { child, slot, mps_ended })
}

/// A spawned worker: the process, its ledger slot, and (in an MPS group) the notice that its
/// group's server is gone.
struct Spawned {
    child: tokio::process::Child,
    slot: Option<(String, u32)>,
    mps_ended: Option<Arc<tokio::sync::Notify>>,
}

/// Waits for a worker's exit; kills it first when its MPS group's server is gone (its
/// driver's server ended: the session cannot go on) or when `kill` is notified. Returns
/// its exit and, when the daemon ended it, why ([`Kind::MpsEnded`], [`Kind::DomainGone`]).
async fn supervise(
    id: u32,
    child: &mut tokio::process::Child,
    mps_ended: Option<Arc<tokio::sync::Notify>>,
    kill: Option<(u16, Arc<tokio::sync::Notify>)>,
) -> (std::io::Result<std::process::ExitStatus>, Option<Kind>) {
    let never = || Arc::new(tokio::sync::Notify::new());
    let domid = kill.as_ref().map(|k| k.0);
    let (mps_ended, kill) = (mps_ended.unwrap_or_else(never), kill.map_or_else(never, |k| k.1));
    tokio::select! {
        s = child.wait() => (s, None),
        _ = mps_ended.notified() => {
            tracing::warn!(zone = id, "ending the session: its MPS group's server is gone");
            let _ = child.kill().await;
            (child.wait().await, Some(Kind::MpsEnded))
        }
        _ = kill.notified() => {
            tracing::info!(zone = id, domid = domid.unwrap_or_default(), "guest domain gone: killing its worker");
            let _ = child.kill().await;
            (child.wait().await, Some(Kind::DomainGone))
        }
    }
}

/// A session's place in its zone: the zone's ledger and the slot taken in it, or the CUDA
/// error it is refused with.
enum Admission {
    Slot { ledger: OwnedFd, slot: u32 },
    Refused(u32),
}

/// The daemon's ledgers, by zone name ([`crate::ledger`]): one while the zone has sessions.
#[derive(Clone, Default)]
pub struct Ledgers(Arc<Mutex<BTreeMap<String, ZoneLedger>>>);

impl Ledgers {
    /// Takes a slot of zone `name`'s ledger for a new session, or says why not.
    fn admit(&self, name: &str, quotas: &crate::zone::Quotas) -> Result<Admission> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(name) {
            map.insert(name.to_owned(), ZoneLedger::new(name).context("cannot make the zone's ledger")?);
        }
        let ledger = map.get_mut(name).expect("inserted above");
        match ledger.take(quotas.max_sessions) {
            Some(slot) => match ledger.fd().try_clone_to_owned() {
                Ok(fd) => Ok(Admission::Slot { ledger: fd, slot }),
                Err(e) => {
                    ledger.release(slot);
                    Err(e).context("cannot share the zone's ledger")
                }
            },
            None => {
                tracing::warn!(
                    zone = name,
                    max_sessions = quotas.max_sessions,
                    "session refused: the zone has max_sessions sessions already (CUDA_ERROR_NOT_PERMITTED)"
                );
                Ok(Admission::Refused(vgpu_proto::code::NOT_PERMITTED))
            }
        }
    }

    /// Whether zone `name` has `max_sessions` sessions already (`None`: none at all).
    fn peek_full(&self, name: &str, quotas: &crate::zone::Quotas) -> Option<bool> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).map(|l| l.sessions() >= quotas.max_sessions.min(crate::ledger::MAX_SLOTS))
    }

    /// A session's worker has been reaped: its slot is cleared and given back.
    fn release(&self, name: &str, slot: u32) -> crate::ledger::Tally {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(l) = map.get_mut(name) else { return Default::default() };
        let counts = l.release(slot);
        if l.sessions() == 0 {
            map.remove(name);
        }
        counts
    }

    /// Every zone with live sessions: sessions, what they hold, their statistics, and the
    /// memory of their contexts.
    fn snapshot(&self) -> BTreeMap<String, (u32, crate::ledger::Usage, crate::ledger::Tally, u64)> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(name, l)| (name.clone(), (l.sessions(), l.total(), l.tally(), l.context_bytes()))).collect()
    }
}

/// A worker about to be spawned: its command, its broker socket pair, and the zone ledger
/// slot it took (whose descriptor the command's child inherits; dropped after the spawn).
struct Launch {
    cmd: tokio::process::Command,
    pair: BrokerPair,
    slot: Option<(String, u32, OwnedFd)>,
    /// For a zone of an MPS group: woken when the group's server is gone.
    mps_ended: Option<Arc<tokio::sync::Notify>>,
    /// The zone's memory quota (for the admin report).
    mem_quota: u64,
}

/// The worker command for a session of zone `name` (refused when the zone has
/// `max_sessions` already).
fn worker_command(
    plane: &Plane,
    id: u32,
    name: &str,
    quotas: &crate::zone::Quotas,
    xen: Option<crate::worker::XenSlot>,
) -> Result<Launch> {
    let (config, exe, ledgers, mps) = (&plane.config, &plane.exe, &plane.ledgers, &plane.mps);
    if ledgers.peek_full(name, quotas) == Some(true) {
        plane.counters.refused(name, "max_sessions");
        let detail = format!(
            "max_sessions: the zone has its {} sessions already (CUDA_ERROR_NOT_PERMITTED)",
            quotas.max_sessions
        );
        plane.events.push(name, Kind::SessionRefused, Some(id), detail);
    }
    // The broker channel: ours stays close-on-exec; the worker's end is inherited only by it.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().context("cannot make the IPC broker channel")?;
    let (ledger, refuse, slot) = match ledgers.admit(name, quotas)? {
        Admission::Slot { ledger, slot } => {
            (Some(LedgerSlot { fd: ledger.as_raw_fd(), slot }), None, Some((name.to_owned(), slot, ledger)))
        }
        Admission::Refused(code) => (None, Some(code), None),
    };
    let placement = config.placement_of(name);
    let (device, mps_client) = match &placement {
        Placement::Isolated => (config.device, None),
        // Only the MIG instance is visible to the worker: it is device 0 there.
        Placement::Mig { .. } => (0, None),
        Placement::Mps { group } => (config.device, Some(mps.client(group)?)),
    };
    let spec = WorkerSpec {
        zone_id: id,
        zone_name: name.to_owned(),
        backend: config.backend,
        device,
        sim_memory_bytes: config.sim_memory_bytes,
        max_ring_bytes: config.max_ring_bytes,
        max_window_bytes: config.max_window_bytes,
        profile_requests: config.profile_requests,
        broker_fd: Some(theirs.as_raw_fd()),
        ledger,
        refuse,
        xen,
        quotas: *quotas,
    };
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("worker").args(["--spec", &spec.to_arg()]).kill_on_drop(true);
    die_with_daemon(&mut cmd, libc::SIGKILL);
    // The sharing mode reaches the worker's driver through its environment (read when it
    // loads): the group's MPS server, or the one MIG instance it may see.
    let mps_ended = match (&placement, mps_client) {
        (_, Some(client)) => {
            cmd.envs(client.env.iter().map(|(k, v)| (*k, v.as_os_str())));
            Some(client.ended)
        }
        (Placement::Mig { uuid }, None) => {
            cmd.env("CUDA_VISIBLE_DEVICES", uuid);
            None
        }
        _ => None,
    };
    inherit_across_exec(&mut cmd, theirs.as_raw_fd());
    if let Some(l) = &spec.ledger {
        inherit_across_exec(&mut cmd, l.fd);
    }
    Ok(Launch { cmd, pair: (ours, theirs), slot, mps_ended, mem_quota: quotas.mem_bytes })
}
