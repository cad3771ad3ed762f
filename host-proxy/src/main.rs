//! host-proxy: the xen-vgpu driver-domain daemon (`serve`) and its per-zone worker
//! (`worker`, started by the daemon, not by hand).
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use host_proxy::backend::{sim::SimGpu, GpuBackend};
use host_proxy::broker::{inherited_stream, BrokerClient};
use host_proxy::config::BackendKind;
use host_proxy::config::{Config, EMBEDDED_DEFAULT};
use host_proxy::device_output::DeviceOutput;
use host_proxy::ledger::{Ledger, Usage};
use host_proxy::worker::{serve, RequestProfile, SessionEnd, WorkerSpec};
use host_proxy::zone::{Quotas, Zone};
use idm_core::{Server, WaitPolicy};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "host-proxy", about = "xen-vgpu driver-domain daemon", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Cuda,
    Sim,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon. Without --config it uses the embedded default: the simulated GPU
    /// (a test double) on /tmp/xen-vgpu/host-proxy.sock.
    Serve {
        /// Configuration file (TOML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the listening socket.
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Show the running daemon's recent zone events (oldest first): sessions started,
    /// ended, failed or refused, guest domains gone, MPS servers gone, CUDA IPC opens
    /// refused, faults (from its admin socket; the daemon keeps the last 512).
    Events {
        /// The daemon's configuration (for its socket); default: the embedded default's.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The daemon's listening socket (its admin socket is `<socket>.admin`).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Only this zone's events.
        #[arg(long)]
        zone: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the running daemon's zones: sessions, memory used against the quota, live
    /// objects, sharing mode, uptime (from its admin socket).
    Status {
        /// The daemon's configuration (for its socket); default: the embedded default's.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The daemon's listening socket (its admin socket is `<socket>.admin`).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve one zone on the connection passed as standard input (started by `serve`).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Open the configured backend once and say what it found (started by `serve` before it
    /// listens, so that a backend that cannot work is refused at start; the daemon itself
    /// never touches the GPU).
    #[command(hide = true)]
    Probe {
        #[arg(long, value_enum)]
        backend: Backend,
        #[arg(long, default_value_t = 0)]
        device: i32,
    },
}

#[derive(clap::Args)]
struct WorkerArgs {
    /// The worker's whole configuration, as the daemon writes it (`WorkerSpec` in TOML).
    #[arg(long)]
    spec: String,
}

/// The worker's captured descriptors 1 and 2 (what kernels print), for its zone.
static DEVICE_OUTPUT: std::sync::OnceLock<std::sync::Arc<DeviceOutput>> = std::sync::OnceLock::new();

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter =
        || tracing_subscriber::EnvFilter::try_from_env("VGPU_LOG").unwrap_or_else(|_| "info".parse().expect("valid"));
    // A worker captures its stdout and stderr before anything prints or the driver loads:
    // the driver writes kernels' printf there, for the guest. Its log goes to the
    // original stderr, which the capture keeps.
    let captured = match cli.command {
        Command::Worker(_) => Some(DeviceOutput::capture()),
        _ => None,
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    match captured {
        Some(Ok((output, log))) => {
            let _ = DEVICE_OUTPUT.set(output);
            tracing_subscriber::fmt()
                .with_env_filter(filter())
                .with_writer(std::sync::Mutex::new(log))
                .with_ansi(false)
                .init();
            // The default hook would print a panic (a host-side bug's message) to stderr,
            // which now goes to the guest: it goes to the log instead.
            std::panic::set_hook(Box::new(|info| tracing::error!("worker panicked: {info}")));
        }
        other => {
            tracing_subscriber::fmt().with_env_filter(filter()).with_writer(std::io::stderr).with_ansi(ansi).init();
            if let Some(Err(e)) = other {
                tracing::warn!(error = %e, "cannot capture device output; kernels' printf stays in the worker's stdout");
            }
        }
    }
    match cli.command {
        Command::Serve { config, socket } => {
            let mut config = match &config {
                Some(path) => Config::load(path)?,
                None => Config::parse(EMBEDDED_DEFAULT, "<embedded default>".as_ref())?,
            };
            if let Some(s) = socket {
                config.socket = s;
            }
            let exe = std::env::current_exe().context("cannot find the host-proxy executable for workers")?;
            let pci = probe_backend(&exe, &config)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(host_proxy::daemon::run(config, exe, pci))
        }
        Command::DefaultConfig => {
            print!("{}", EMBEDDED_DEFAULT.trim_start());
            Ok(())
        }
        Command::Status { config, socket, json } => {
            let zones = host_proxy::status::query(&daemon_socket(socket, config.as_deref())?)?;
            print!("{}", if json { host_proxy::status::json(&zones) } else { host_proxy::status::table(&zones) });
            Ok(())
        }
        Command::Events { config, socket, zone, json } => {
            let mut events = host_proxy::status::query_events(&daemon_socket(socket, config.as_deref())?)?;
            if let Some(zone) = &zone {
                events.retain(|e| &e.zone == zone);
            }
            let text =
                if json { host_proxy::status::events_json(&events) } else { host_proxy::status::events_table(&events) };
            print!("{text}");
            Ok(())
        }
        Command::Worker(args) => {
            let spec = WorkerSpec::from_arg(&args.spec).context("the worker's --spec is not a worker spec")?;
            let code = worker(spec)?;
            std::process::exit(code)
        }
        Command::Probe { backend, device } => match probe(backend, device) {
            Ok(found) => {
                println!("{found}");
                Ok(())
            }
            Err(e) => {
                // One line, causes included, for the daemon to quote.
                println!("{e:#}");
                std::process::exit(1)
            }
        },
    }
}

/// The daemon's socket for `status` and `events`: `--socket`, else the configuration's,
/// else the embedded default's.
fn daemon_socket(socket: Option<PathBuf>, config: Option<&std::path::Path>) -> Result<PathBuf> {
    Ok(match (socket, config) {
        (Some(s), _) => s,
        (None, Some(path)) => Config::load(path)?.socket,
        (None, None) => Config::parse(EMBEDDED_DEFAULT, "<embedded default>".as_ref())?.socket,
    })
}

/// `host-proxy probe`: opens the backend; one line about what it found.
fn probe(backend: Backend, device: i32) -> Result<String> {
    let (info, pci) = match backend {
        Backend::Sim => (SimGpu::new(1 << 20).device_info(), None),
        Backend::Cuda => {
            let mut gpu = host_proxy::backend::cuda::CudaGpu::open(device).context("cannot open the GPU")?;
            (gpu.device_info(), gpu.pci_bus_id().ok())
        }
    };
    let pci = pci.map_or_else(String::new, |p| format!(" pci={p}"));
    Ok(format!("{} ({} MiB){pci}", info.name, info.total_mem >> 20))
}

/// How long the start-up probe of the backend may take (a driver's first start can be slow).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Refuses to start when the configured backend cannot work here: `backend = "cuda"` on a
/// machine without a usable driver or device fails now, with the driver's reason, instead
/// of every zone's worker failing later. The probe runs in a child process (the daemon never
/// loads the driver). Returns the device's PCI bus id, for the metrics (NVML).
fn probe_backend(exe: &std::path::Path, config: &Config) -> Result<Option<String>> {
    let backend = match config.backend {
        host_proxy::config::BackendKind::Cuda => "cuda",
        host_proxy::config::BackendKind::Sim => return Ok(None),
    };
    let mut child = std::process::Command::new(exe)
        .args(["probe", "--backend", backend, "--device", &config.device.to_string()])
        .stdout(std::process::Stdio::piped())
        // Its log is not needed (the reason comes on stdout); a full pipe must not stall it.
        .stderr(std::process::Stdio::null())
        .env("RUST_BACKTRACE", "0")
        .spawn()
        .context("cannot start the backend probe")?;
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > PROBE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "backend = \"{backend}\": opening device {} took longer than {PROBE_TIMEOUT:?}",
                config.device
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut out = String::new();
    if let Some(stdout) = child.stdout.as_mut() {
        let _ = std::io::Read::read_to_string(stdout, &mut out);
    }
    let out = out.trim();
    if !status.success() {
        let why = match out.lines().last() {
            Some(line) => line.to_owned(),
            None => format!("the probe ended with {status} and no message"),
        };
        anyhow::bail!("backend = \"{backend}\" does not work on this machine (device {}): {why}", config.device);
    }
    tracing::info!(backend, device = config.device, found = out, "backend probed");
    Ok(out.rsplit_once(" pci=").map(|(_, p)| p.to_owned()))
}

fn worker(spec: WorkerSpec) -> Result<i32> {
    let span = tracing::info_span!("zone", id = spec.zone_id, name = %spec.zone_name);
    let _g = span.enter();
    // Take the inherited descriptors first, so that they are closed whatever fails.
    let broker = match spec.broker_fd {
        Some(fd) => {
            let stream =
                inherited_stream(fd).with_context(|| format!("cannot use the IPC broker channel (fd {fd})"))?;
            Some(BrokerClient::new(stream).context("cannot set up the IPC broker channel")?)
        }
        None => None,
    };
    let ledger = match spec.ledger {
        Some(l) => {
            let fd = host_proxy::broker::inherited_fd(l.fd).context("cannot take the zone ledger")?;
            Ledger::shared(fd, l.slot).context("cannot use the zone ledger")?
        }
        None => Ledger::private(),
    };
    let (ledger, refusal) = admission(&spec, ledger);
    // A refused session is answered at once; its guest gets a bounded time to ask.
    let policy = WaitPolicy { spin_iters: 20_000, timeout: refusal.map(|_| Duration::from_secs(5)) };
    let limits = (usize::try_from(spec.max_ring_bytes)?, usize::try_from(spec.max_window_bytes)?);
    if let Some(x) = spec.xen {
        return xen_worker(&spec, x.domid, x.slot, limits, policy, broker, (ledger, refusal));
    }
    let fd: OwnedFd =
        std::io::stdin().as_fd().try_clone_to_owned().context("worker needs the guest connection on stdin")?;
    let stream = UnixStream::from(fd);
    let limits = idm_shm::ServerLimits {
        max_ring_size: limits.0,
        max_window_size: limits.1,
        handshake_timeout: Duration::from_secs(5),
    };
    let endpoint = idm_shm::accept_stream(stream, &limits, policy).context("shared-memory handshake failed")?;
    let idm_shm::ShmEndpoint { channel, window, layout, region, .. } = endpoint;
    let session = Session {
        id: spec.zone_id,
        channel,
        window,
        layout,
        dma_region: Some(region),
        words: None,
        quotas: spec.quotas,
        broker,
        ledger,
        refusal,
    };
    run_on_backend(&spec, session, || ())
}

/// Whether the session may start: the daemon may have refused it already (the zone's
/// `max_sessions`); otherwise its primary context's memory is charged to the zone now,
/// before the backend makes the context, and a zone without room for it is refused with
/// `CUDA_ERROR_OUT_OF_MEMORY`.
fn admission(spec: &WorkerSpec, mut ledger: Ledger) -> (Ledger, Option<u32>) {
    if let Some(code) = spec.refuse {
        return (ledger, Some(code));
    }
    let base = spec.quotas.context_mem_bytes.unwrap_or(match spec.backend {
        BackendKind::Sim => <SimGpu as GpuBackend>::CONTEXT_MEM_BYTES,
        BackendKind::Cuda => <host_proxy::backend::cuda::CudaGpu as GpuBackend>::CONTEXT_MEM_BYTES,
    });
    let want = Usage { mem_bytes: base, objects: 0 };
    match ledger.admit(want, spec.quotas.mem_bytes, u64::from(spec.quotas.max_handles)) {
        Ok(()) => (ledger, None),
        Err(_) => {
            tracing::warn!(
                zone = %spec.zone_name,
                context_mem_bytes = base,
                mem_bytes = spec.quotas.mem_bytes,
                "session refused: its context's memory does not fit in what is left of the zone's memory quota"
            );
            (ledger, Some(vgpu_proto::code::OUT_OF_MEMORY))
        }
    }
}

/// Opens the configured backend and serves the zone on it — unless the session is refused
/// (a limit of the zone), which is answered at attach without touching the GPU.
fn run_on_backend<M, N, W, D>(spec: &WorkerSpec, session: Session<M, N, W, D>, ended: impl FnOnce()) -> Result<i32>
where
    M: idm_core::SharedMemory,
    N: idm_core::Notifier,
    W: idm_core::Waiter,
    D: idm_core::SharedMemory,
{
    if let Some(code) = session.refusal {
        return refuse(session, code, ended);
    }
    match spec.backend {
        BackendKind::Sim => run_zone(session, SimGpu::new(spec.sim_memory_bytes), spec.profile_requests, ended),
        BackendKind::Cuda => {
            let gpu = host_proxy::backend::cuda::CudaGpu::open(spec.device).context("cannot open the GPU")?;
            run_zone(session, gpu, spec.profile_requests, ended)
        }
    }
}

/// A refused session: the hello is answered, then every request (the attach first) with
/// CUDA error `code`; the worker ends when the guest goes or after a bounded wait.
fn refuse<M, N, W, D>(session: Session<M, N, W, D>, code: u32, ended: impl FnOnce()) -> Result<i32>
where
    M: idm_core::SharedMemory,
    N: idm_core::Notifier,
    W: idm_core::Waiter,
    D: idm_core::SharedMemory,
{
    let max_frame = u32::try_from(session.layout.ring_size() / 2).unwrap_or(u32::MAX);
    let mut buf = vec![0u8; session.layout.ring_size()];
    let mut scratch = vec![0u8; 256];
    let mut server = Server::accept(session.channel, max_frame, &mut buf).context("hello exchange failed")?;
    host_proxy::worker::refuse(&mut server, code, &mut buf, &mut scratch);
    ended();
    Ok(host_proxy::worker::REFUSED_EXIT)
}

/// A Xen guest's slot: map its grants, bind its event channel, serve it, close the slot.
fn xen_worker(
    spec: &WorkerSpec,
    domid: u16,
    slot: u32,
    (max_ring_size, max_window_size): (usize, usize),
    policy: WaitPolicy,
    broker: Option<BrokerClient>,
    (ledger, refusal): (Ledger, Option<u32>),
) -> Result<i32> {
    use host_proxy::xen::{backend_dir, frontend_dir};
    let mut xs = idm_xen::XenStore::open().context("cannot reach xenstore")?;
    let (front, back) = (frontend_dir(domid, slot), backend_dir(domid, slot));
    let limits = idm_xen::channel::BackendLimits { max_ring_size, max_window_size };
    let ep = match idm_xen::channel::backend_accept(&mut xs, &front, &back, domid, limits, policy) {
        Ok(ep) => ep,
        Err(e) => {
            let _ = idm_xen::xenbus::set_state(&mut xs, &back, idm_xen::XenbusState::Closed);
            return Err(e).with_context(|| format!("cannot connect to the frontend {front}"));
        }
    };
    tracing::info!(domid, slot, "Xen channel connected");
    // Host functions' words live in the window: the zone keeps a clone of the grant
    // mapping (the driver does not take it) for as long as its backend lives.
    let words = Some((ep.region.clone(), ep.layout.window_offset(), ep.layout.window_size()));
    let session = Session {
        id: spec.zone_id,
        channel: ep.channel,
        window: ep.window,
        layout: ep.layout,
        dma_region: None,
        words,
        quotas: spec.quotas,
        broker,
        ledger,
        refusal,
    };
    // Closing once the session has ended (the zone is being torn down), Closed after.
    let closing = |xs: &mut idm_xen::XenStore| {
        let _ = idm_xen::xenbus::set_state(xs, &back, idm_xen::XenbusState::Closing);
    };
    let code = run_on_backend(spec, session, || closing(&mut xs));
    let _ = idm_xen::xenbus::set_state(&mut xs, &back, idm_xen::XenbusState::Closed);
    code
}

/// One zone's connected transport, whatever carries it.
struct Session<M, N, W, D> {
    id: u32,
    channel: idm_core::Channel<M, N, W>,
    window: idm_core::DataWindow<D>,
    layout: idm_shm::ChannelLayout,
    /// The shared memory to register with the GPU driver for direct DMA (local transport).
    dma_region: Option<idm_shm::MemfdRegion>,
    /// Otherwise (Xen): the grant mapping, the window's offset in it and its length.
    words: Option<(idm_xen::GrantRegion, usize, usize)>,
    quotas: Quotas,
    broker: Option<BrokerClient>,
    /// The zone's ledger, this session's slot (its primary context already charged).
    ledger: Ledger,
    /// The CUDA error the session is refused with, if it is.
    refusal: Option<u32>,
}

/// Serves one zone; `ended` runs when the session is over, before the zone is torn down.
/// With `profile`, per-request timings are logged at the end.
fn run_zone<B, M, N, W, D>(session: Session<M, N, W, D>, backend: B, profile: bool, ended: impl FnOnce()) -> Result<i32>
where
    B: GpuBackend,
    M: idm_core::SharedMemory,
    N: idm_core::Notifier,
    W: idm_core::Waiter,
    D: idm_core::SharedMemory,
{
    let Session { id, channel, window, layout, dma_region, words, quotas, broker, ledger, .. } = session;
    let max_frame = u32::try_from(layout.ring_size() / 2).unwrap_or(u32::MAX);
    let mut buf = vec![0u8; layout.ring_size()];
    let mut scratch = vec![0u8; layout.ring_size()];
    let mut server = Server::accept(channel, max_frame, &mut buf).context("hello exchange failed")?;
    let mut zone = Zone::new(id, backend, quotas);
    zone.set_ledger(ledger);
    zone.publish_usage();
    if let Some(region) = dma_region {
        match zone.attach_window(region, layout.window_offset(), layout.window_size()) {
            Ok(direct) => tracing::debug!(direct, "data window attached"),
            Err(e) => tracing::warn!(error = %e, "could not register the data window; copies are staged"),
        }
    }
    if let Some((region, offset, len)) = words {
        if let Err(e) = zone.attach_grant_window(region, offset, len) {
            tracing::warn!(error = %e, "could not keep the window for host functions; they are not offered");
        }
    }
    if let Some(broker) = broker {
        zone.set_broker(Box::new(broker));
    }
    if let Some(output) = DEVICE_OUTPUT.get() {
        zone.set_device_output(output.clone());
    }
    tracing::info!(max_frame = server.max_frame(), window = window.size(), "zone attached");
    let mut profile = profile.then(RequestProfile::default);
    let end = serve(&mut server, &window, &mut zone, &mut buf, &mut scratch, profile.as_mut());
    // Host functions still waiting for this guest give up (the zone is being torn down).
    host_proxy::backend::WORKER_ENDING.store(true, std::sync::atomic::Ordering::Release);
    ended();
    for line in profile.as_mut().map(RequestProfile::report).unwrap_or_default() {
        tracing::info!("request profile: {line}");
    }
    tracing::info!(mem_used = zone.mem_used(), objects = zone.live_objects(), "releasing zone resources");
    // After a panic the zone's tables may be half-updated: teardown does its best, and
    // should it panic too, the process's exit releases everything the driver holds.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| zone.teardown())).is_err() {
        tracing::error!("teardown panicked; the worker's exit releases the zone's GPU resources");
    }
    Ok(match end {
        SessionEnd::PeerGone => {
            tracing::info!("guest disconnected");
            0
        }
        SessionEnd::Violation(e) => {
            tracing::warn!(error = %e, "zone failed: protocol violation");
            3
        }
        SessionEnd::Panicked { request } => {
            tracing::error!(request, "session ended: a request panicked (a host-proxy bug; please report it)");
            4
        }
    })
}
