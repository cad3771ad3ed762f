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
use crate::config::{BackendKind, Config, XenMode};
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
}

type Zones = Arc<Mutex<BTreeMap<u32, ZoneRecord>>>;

/// The admin socket path that goes with a listening socket.
pub fn admin_socket_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".admin");
    PathBuf::from(p)
}

fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create socket directory {}", dir.display()))?;
    }
    // A socket file left by a previous run would make bind fail; a live daemon would still
    // answer on it, so only remove it when nobody does.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another host-proxy is already listening on {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(config: Config, exe: PathBuf) -> Result<()> {
    let listener = bind(&config.socket)?;
    let admin_path = admin_socket_path(&config.socket);
    let admin = bind(&admin_path)?;
    tracing::info!(socket = %config.socket.display(), backend = ?config.backend, "host-proxy listening");
    let zones: Zones = Arc::default();
    let broker = Broker::new();
    let config = Arc::new(config);
    let mut next_zone = 1u32;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (xen_tx, mut xen_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut xen = start_toolstack(&config, xen_tx)?;
    loop {
        tokio::select! {
            Some(msg) = xen_rx.recv() => if let Some(x) = xen.as_mut() {
                match msg {
                    ToDaemon::Start { domid, slot, name } => {
                        let id = next_zone;
                        next_zone = next_zone.wrapping_add(1).max(1);
                        if let Err(e) = start_xen_zone(id, domid, slot, &name, &config, &exe, &zones, &broker, x) {
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
                    if let Err(e) = start_zone(id, stream, &config, &exe, &zones, &broker) {
                        tracing::warn!(zone = id, error = %format!("{e:#}"), "could not start zone");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            conn = admin.accept() => if let Ok((stream, _)) = conn {
                let zones = zones.clone();
                tokio::spawn(async move { let _ = report(stream, &zones).await; });
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    tracing::info!("shutting down: stopping all zone workers");
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

fn start_toolstack(config: &Config, tx: tokio::sync::mpsc::UnboundedSender<ToDaemon>) -> Result<Option<XenSide>> {
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
    std::thread::Builder::new().name("xen-toolstack".into()).spawn(move || {
        if let Err(e) = toolstack.run() {
            tracing::error!(error = %format!("{e:#}"), "the Xen toolstack thread stopped");
        }
    })?;
    tracing::info!(slots = config.xen_slots, "serving Xen guests (xenstore device vgpu)");
    Ok(Some(XenSide { done: done_tx, kills: Arc::default() }))
}

async fn report(mut stream: UnixStream, zones: &Zones) -> std::io::Result<()> {
    let text = {
        let zones = zones.lock().unwrap_or_else(|p| p.into_inner());
        let mut t = String::new();
        for (id, z) in zones.iter() {
            t.push_str(&format!(
                "zone {id} name={} uid={} peer_pid={} worker_pid={}\n",
                z.name,
                z.uid,
                z.peer_pid.map_or("-".into(), |p| p.to_string()),
                z.worker_pid.map_or("-".into(), |p| p.to_string()),
            ));
        }
        t.push_str("end\n");
        t
    };
    stream.write_all(text.as_bytes()).await
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

fn start_zone(
    id: u32,
    stream: UnixStream,
    config: &Arc<Config>,
    exe: &Path,
    zones: &Zones,
    broker: &Arc<Broker>,
) -> Result<()> {
    let cred = stream.peer_cred().context("cannot read the peer's credentials")?;
    let Some((name, quotas)) = config.zone_for_uid(cred.uid()) else {
        tracing::warn!(uid = cred.uid(), "refusing peer: its uid matches no [[zone]] and allow_unlisted = false");
        return Ok(());
    };
    let std_stream = stream.into_std().context("cannot take the connection")?;
    std_stream.set_nonblocking(false)?;
    let fd: OwnedFd = std_stream.into();
    let (mut cmd, pair) = worker_command(id, &name, &quotas, config, exe)?;
    cmd.stdin(Stdio::from(fd));
    let peer = Peer { conn: id, zone: name.clone(), uid: cred.uid(), groups: config.groups_of(&name) };
    let mut child = spawn_worker(cmd, pair, peer, cred.pid(), exe, zones, broker)?;
    tracing::info!(zone = id, name = %name, uid = cred.uid(), peer_pid = ?cred.pid(), worker_pid = ?child.id(), "zone started");
    let zones = zones.clone();
    let broker = broker.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        zone_ended(id, status, &broker, &zones).await;
    });
    Ok(())
}

/// After a worker exits: its exports die with it (importers are told) before the zone is
/// reported gone.
async fn zone_ended(id: u32, status: std::io::Result<std::process::ExitStatus>, broker: &Arc<Broker>, zones: &Zones) {
    broker.detach(id).await;
    zones.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    match status {
        Ok(s) if s.success() => tracing::info!(zone = id, "zone ended: guest disconnected"),
        Ok(s) => tracing::warn!(zone = id, status = %s, "zone ended abnormally; its resources are released"),
        Err(e) => tracing::error!(zone = id, error = %e, "lost track of zone worker"),
    }
}

/// A Xen guest's slot reached Initialised: a worker maps its grants and serves it.
#[allow(clippy::too_many_arguments)]
fn start_xen_zone(
    id: u32,
    domid: u16,
    slot: u32,
    domain: &str,
    config: &Arc<Config>,
    exe: &Path,
    zones: &Zones,
    broker: &Arc<Broker>,
    xen: &XenSide,
) -> Result<()> {
    let Some((name, quotas)) = config.zone_for_domain(domain) else {
        tracing::warn!(domid, domain, "refusing guest: its name matches no [[zone]] and allow_unlisted = false");
        return Ok(());
    };
    let (mut cmd, pair) = worker_command(id, &name, &quotas, config, exe)?;
    cmd.args(["--xen-domid", &domid.to_string(), "--xen-slot", &slot.to_string()]).stdin(Stdio::null());
    let peer = Peer { conn: id, zone: name.clone(), uid: 0, groups: config.groups_of(&name) };
    let mut child = spawn_worker(cmd, pair, peer, None, exe, zones, broker)?;
    tracing::info!(zone = id, name = %name, domid, slot, worker_pid = ?child.id(), "zone started (Xen guest)");
    let kill = Arc::new(tokio::sync::Notify::new());
    xen.kills.lock().unwrap_or_else(|p| p.into_inner()).entry(domid).or_default().push(kill.clone());
    let (zones, broker, done, kills) = (zones.clone(), broker.clone(), xen.done.clone(), xen.kills.clone());
    tokio::spawn(async move {
        let status = tokio::select! {
            s = child.wait() => s,
            _ = kill.notified() => {
                tracing::info!(zone = id, domid, "guest domain gone: killing its worker");
                let _ = child.kill().await;
                child.wait().await
            }
        };
        if let Some(list) = kills.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&domid) {
            list.retain(|k| !Arc::ptr_eq(k, &kill));
        }
        let failed = !matches!(&status, Ok(s) if s.success());
        zone_ended(id, status, &broker, &zones).await;
        let _ = done.send(ToToolstack::SlotDone { domid, slot, failed });
    });
    Ok(())
}

/// The IPC broker socket pair of a worker: (the daemon's end, the worker's end).
type BrokerPair = (std::os::unix::net::UnixStream, std::os::unix::net::UnixStream);

/// Spawns a zone worker and registers it: its broker channel, its admin record.
fn spawn_worker(
    mut cmd: tokio::process::Command,
    (ours, theirs): BrokerPair,
    peer: Peer,
    peer_pid: Option<i32>,
    exe: &Path,
    zones: &Zones,
    broker: &Arc<Broker>,
) -> Result<tokio::process::Child> {
    let child = cmd.spawn().with_context(|| format!("cannot spawn worker {}", exe.display()))?;
    // Only the worker holds its end now: when it exits, the channel closes.
    drop(theirs);
    ours.set_nonblocking(true)?;
    let ours = UnixStream::from_std(ours).context("cannot serve the IPC broker channel")?;
    let record = ZoneRecord { name: peer.zone.clone(), uid: peer.uid, peer_pid, worker_pid: child.id() };
    zones.lock().unwrap_or_else(|p| p.into_inner()).insert(peer.conn, record);
    broker.attach(peer, ours);
    Ok(child)
}

/// The worker command for a zone, and its IPC broker socket pair.
fn worker_command(
    id: u32,
    name: &str,
    quotas: &crate::zone::Quotas,
    config: &Config,
    exe: &Path,
) -> Result<(tokio::process::Command, BrokerPair)> {
    // The broker channel: ours stays close-on-exec; the worker's end is inherited only by it.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().context("cannot make the IPC broker channel")?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("worker")
        .args(["--zone-id", &id.to_string(), "--zone-name", name])
        .args([
            "--backend",
            match config.backend {
                BackendKind::Cuda => "cuda",
                BackendKind::Sim => "sim",
            },
        ])
        .args(["--device", &config.device.to_string()])
        .args(["--sim-memory-bytes", &config.sim_memory_bytes.to_string()])
        .args(["--mem-bytes", &quotas.mem_bytes.to_string()])
        .args(["--max-handles", &quotas.max_handles.to_string()])
        .args(["--max-async-in-flight", &quotas.max_async_in_flight.to_string()])
        .args(["--max-ring-bytes", &config.max_ring_bytes.to_string()])
        .args(["--max-window-bytes", &config.max_window_bytes.to_string()])
        .args(config.profile_requests.then_some("--profile-requests"))
        .args(["--broker-fd", &theirs.as_raw_fd().to_string()])
        .kill_on_drop(true);
    inherit_across_exec(&mut cmd, theirs.as_raw_fd());
    Ok((cmd, (ours, theirs)))
}
