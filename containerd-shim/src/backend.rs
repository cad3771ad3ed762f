//! What the shim asks of a zone: the seam between containerd's task API ([`crate::tasks`])
//! and whatever runs the processes — the pod's Xen zone, or the host-process test double
//! ([`crate::host_double`]) that CI drives through a real containerd.

use std::path::PathBuf;

/// One mount of a container's root filesystem, as containerd's snapshotter hands it over
/// (`CreateTaskRequest.rootfs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootfsMount {
    /// Filesystem type (`overlay`, `bind`, …).
    pub fs_type: String,
    /// What is mounted.
    pub source: String,
    /// Mount options (`lowerdir=…`, `ro`, …).
    pub options: Vec<String>,
}

/// Where a process's standard streams go: containerd's FIFOs (an empty path: none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stdio {
    /// FIFO the process reads its standard input from.
    pub stdin: String,
    /// FIFO its standard output goes to.
    pub stdout: String,
    /// FIFO its standard error goes to.
    pub stderr: String,
}

/// A process to run inside a container: the OCI `process` section, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    /// `argv`; never empty.
    pub args: Vec<String>,
    /// `KEY=value` pairs.
    pub env: Vec<String>,
    /// Working directory inside the container's root filesystem (absolute).
    pub cwd: String,
    /// User id the process runs as.
    pub uid: u32,
    /// Group id the process runs as.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// Its standard streams.
    pub stdio: Stdio,
}

/// The pod a container belongs to (from the CRI annotations; a container started without
/// Kubernetes, e.g. by `ctr run`, is its own pod).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIdentity {
    /// The sandbox id that groups a pod's containers into one shim and one zone.
    pub sandbox_id: String,
    /// `namespace/name` of the pod, when Kubernetes named it.
    pub name: Option<String>,
    /// The pod's uid, when Kubernetes gave one.
    pub uid: Option<String>,
}

/// A container's init process and everything it needs, read from the bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Container id (containerd's).
    pub id: String,
    /// The bundle directory (`config.json`, `rootfs/`).
    pub bundle: PathBuf,
    /// The root filesystem, absolute: `<bundle>/<root.path>`.
    pub rootfs: PathBuf,
    /// Whether the spec asks for a read-only root filesystem.
    pub rootfs_readonly: bool,
    /// Mounts containerd asks the shim to make at `rootfs` (empty: already there).
    pub mounts: Vec<RootfsMount>,
    /// The pod it belongs to.
    pub pod: PodIdentity,
    /// The init process.
    pub process: ProcessSpec,
}

/// Called once, from any thread, when a process the backend created has ended: its exit
/// status as a shell reports it (128 + signal number for a signal).
pub type ExitSink = Box<dyn FnOnce(u32) + Send + 'static>;

/// Why the backend could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request is fine but this backend cannot do it (yet).
    #[error("{0}")]
    Unsupported(String),
    /// The request names something the container does not have, or is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The zone or the host failed.
    #[error("{0}")]
    Failed(String),
}

/// Runs containers' processes for one pod sandbox (one shim instance = one pod = one zone).
///
/// Processes are created stopped (`create`, `create_exec`) and run at `start`, as containerd's
/// task API has them. Every created process has its [`ExitSink`] called exactly once — also
/// when it never started and was killed, or when creating it failed after the sink was taken —
/// but never on the thread of the call that took it, which holds the task table's lock.
pub trait ZoneBackend: Send + Sync + 'static {
    /// Prepares a container (its root filesystem at `spec.rootfs`, its stdio) and creates
    /// its init process, not yet running. Returns the process's pid.
    fn create(&self, spec: &ContainerSpec, on_exit: ExitSink) -> Result<u32, BackendError>;
    /// Creates another process in the running container `container_id`, not yet running.
    fn create_exec(&self, container_id: &str, process: &ProcessSpec, on_exit: ExitSink) -> Result<u32, BackendError>;
    /// Lets a created process run.
    fn start(&self, pid: u32) -> Result<(), BackendError>;
    /// Sends `signal` to the process `pid`, or with `all` to every process of the container.
    fn signal(&self, container_id: &str, pid: u32, signal: i32, all: bool) -> Result<(), BackendError>;
    /// Closes the process's standard input (containerd's `CloseIO`).
    fn close_stdin(&self, pid: u32) -> Result<(), BackendError>;
    /// Releases what the container holds (its root filesystem's mounts); its processes have
    /// all ended.
    fn remove(&self, container_id: &str) -> Result<(), BackendError>;
    /// The shim is exiting: end the zone.
    fn shutdown(&self);
}
