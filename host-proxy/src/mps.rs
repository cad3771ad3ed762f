//! CUDA MPS servers for the sharing groups whose zones have `sharing = "mps"`.
//!
//! The zones of such a group trust each other enough to share one MPS server: their
//! workers are clients of it (the driver reads `CUDA_MPS_PIPE_DIRECTORY` when it loads), so
//! their kernels run concurrently instead of time-sliced. Each group gets its own control
//! daemon (`nvidia-cuda-mps-control -f`, in the foreground so the daemon supervises it)
//! with its own pipe and log folders: another group's or an isolated zone's workers never
//! reach it. The control daemon starts with the group's first session and is asked to quit
//! (`quit` on its control pipe) when host-proxy stops. Should it end on its own, every
//! session of the group is ended (its workers are killed: their MPS server is gone, and a
//! fault in one MPS client is the whole server's — so a fault stays inside the group) and
//! the next session starts a fresh one.
//!
//! A fault in one client is, for MPS, the fault of every client of that server: the driver
//! ends them all. That is the trade the group's zones make for concurrency; zones outside
//! the group are unaffected (their own contexts, or their own group's server).

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// How long a fresh control daemon may take to open its control pipe.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a control daemon may take to quit when asked.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// One group's running control daemon.
struct Server {
    pipe: PathBuf,
    log: PathBuf,
    /// Woken (all waiters) when the control daemon has ended on its own: the group's
    /// workers are killed.
    ended: Arc<tokio::sync::Notify>,
    /// Set when host-proxy asked it to quit (its end is then expected).
    stopping: Arc<std::sync::atomic::AtomicBool>,
    /// The supervising task (waits for the control daemon's exit).
    watch: tokio::task::JoinHandle<()>,
}

/// The MPS servers of the daemon's groups, started on demand.
#[derive(Clone)]
pub struct MpsServers {
    control: PathBuf,
    dir: PathBuf,
    servers: Arc<Mutex<BTreeMap<String, Server>>>,
}

/// What a worker of an MPS group needs: the environment that makes its driver a client of
/// the group's server, and the notice that the server is gone.
pub struct Client {
    /// `CUDA_MPS_PIPE_DIRECTORY` and `CUDA_MPS_LOG_DIRECTORY`.
    pub env: [(&'static str, PathBuf); 2],
    /// Woken when the group's control daemon ended on its own.
    pub ended: Arc<tokio::sync::Notify>,
}

impl MpsServers {
    /// Servers run by `control`, with their folders under `dir`.
    pub fn new(control: PathBuf, dir: PathBuf) -> MpsServers {
        MpsServers { control, dir, servers: Arc::default() }
    }

    /// The client environment of `group`'s server, starting the server first if it does
    /// not run. Blocks (at most `START_TIMEOUT`) while a fresh control daemon opens its
    /// pipe.
    pub fn client(&self, group: &str) -> Result<Client> {
        let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = servers.get(group) {
            if !s.watch.is_finished() {
                return Ok(Client { env: env(&s.pipe, &s.log), ended: s.ended.clone() });
            }
            servers.remove(group);
        }
        let server = self.start(group)?;
        let client = Client { env: env(&server.pipe, &server.log), ended: server.ended.clone() };
        servers.insert(group.to_owned(), server);
        Ok(client)
    }

    fn start(&self, group: &str) -> Result<Server> {
        if group.is_empty() || !group.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            anyhow::bail!("sharing group {group:?}: an MPS group's name must be letters, digits, '-' or '_'");
        }
        let (pipe, log) = (self.dir.join(group).join("pipe"), self.dir.join(group).join("log"));
        for d in [&pipe, &log] {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                .with_context(|| format!("cannot restrict {}", d.display()))?;
        }
        // A control pipe left by an earlier run would look like a live server.
        let _ = std::fs::remove_file(pipe.join("control"));
        let mut cmd = tokio::process::Command::new(&self.control);
        cmd.arg("-f")
            .env("CUDA_MPS_PIPE_DIRECTORY", &pipe)
            .env("CUDA_MPS_LOG_DIRECTORY", &log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        // A daemon killed without asking it to quit must not leave it (and its server,
        // holding GPU memory) behind for the next daemon's server of the group to clash with.
        crate::daemon::die_with_daemon(&mut cmd, libc::SIGTERM);
        let mut child =
            cmd.spawn().with_context(|| format!("cannot start the MPS control daemon {}", self.control.display()))?;
        let started = Instant::now();
        while !pipe.join("control").exists() {
            if let Ok(Some(status)) = child.try_wait() {
                anyhow::bail!(
                    "the MPS control daemon of group {group:?} exited at start ({status}); see {}",
                    log.display()
                );
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = child.start_kill();
                anyhow::bail!("the MPS control daemon of group {group:?} opened no control pipe in {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!(group, pipe = %pipe.display(), pid = ?child.id(), "MPS control daemon started");
        let ended = Arc::new(tokio::sync::Notify::new());
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (g, e, st) = (group.to_owned(), ended.clone(), stopping.clone());
        let watch = tokio::spawn(async move {
            let status = child.wait().await;
            if st.load(std::sync::atomic::Ordering::Acquire) {
                tracing::info!(group = g, status = ?status, "MPS control daemon stopped");
            } else {
                tracing::error!(
                    group = g,
                    status = ?status,
                    "MPS control daemon ended on its own: ending every session of its group (their MPS server is gone)"
                );
                e.notify_waiters();
            }
        });
        Ok(Server { pipe, log, ended, stopping, watch })
    }

    /// Whether any group's control daemon runs.
    pub fn running(&self) -> bool {
        self.count() > 0
    }

    /// Control daemons running.
    pub fn count(&self) -> usize {
        self.servers.lock().unwrap_or_else(|p| p.into_inner()).values().filter(|s| !s.watch.is_finished()).count()
    }

    /// Asks every control daemon to quit (it stops its server once the clients are gone)
    /// and waits for each, bounded; one that does not quit is killed.
    pub async fn stop_all(&self) {
        let servers: Vec<(String, Server)> =
            std::mem::take(&mut *self.servers.lock().unwrap_or_else(|p| p.into_inner())).into_iter().collect();
        for (group, s) in servers {
            s.stopping.store(true, std::sync::atomic::Ordering::Release);
            if let Err(e) = quit(&self.control, &s.pipe, &s.log).await {
                tracing::warn!(group, error = %format!("{e:#}"), "could not ask the MPS control daemon to quit");
            }
            let mut watch = s.watch;
            if tokio::time::timeout(QUIT_TIMEOUT, &mut watch).await.is_err() {
                tracing::warn!(group, "the MPS control daemon did not quit in time; killing it");
                watch.abort();
            }
        }
    }
}

fn env(pipe: &Path, log: &Path) -> [(&'static str, PathBuf); 2] {
    [("CUDA_MPS_PIPE_DIRECTORY", pipe.to_owned()), ("CUDA_MPS_LOG_DIRECTORY", log.to_owned())]
}

/// Sends `quit` to the control daemon of `pipe`.
async fn quit(control: &Path, pipe: &Path, log: &Path) -> Result<()> {
    let mut child = tokio::process::Command::new(control)
        .env("CUDA_MPS_PIPE_DIRECTORY", pipe)
        .env("CUDA_MPS_LOG_DIRECTORY", log)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run the MPS control program")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(b"quit\n").await?;
    }
    tokio::time::timeout(QUIT_TIMEOUT, child.wait()).await.context("the quit command hung")??;
    Ok(())
}
