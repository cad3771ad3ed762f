//! containerd's side: the shim v2 `Shim` (start, delete after a lost shim, wait) and the
//! ttrpc `Task` service, mapped onto [`Tasks`] over the configured [`ZoneBackend`]; events
//! forwarded to containerd in the order the state machine queued them.

use crate::backend::{RootfsMount, Stdio, ZoneBackend};
use crate::host_double::{self, HostProcessBackend};
use crate::spec::{self, SpecError};
use crate::tasks::{Event, Exit, Status, TaskError, Tasks};
use containerd_shim::api;
use containerd_shim::protos::events::task as ev;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::SystemTime;

/// The environment variable that picks the backend.
pub const BACKEND_ENV: &str = "XENVGPU_SHIM_BACKEND";
/// Its value for the host-process test double.
pub const HOST_DOUBLE: &str = "host-process-test-double";
/// Exit status reported for a container whose shim was lost (SIGKILL, as runc's shim does).
const LOST_SHIM_STATUS: u32 = 128 + 9;

/// The backends the shim can run containers with.
pub enum Backend {
    /// Plain host processes: the test double of [`host_double`].
    HostDouble(HostProcessBackend),
    /// One Xen zone per pod: not built yet; every create is refused with this reason.
    Xen,
}

const XEN_NOT_YET: &str = "the xenvgpu shim's Xen zone backend is not built yet (it needs the guest agent's \
    in-zone container runtime and the image as a PV block device, issue 17); only the host-process test double \
    (XENVGPU_SHIM_BACKEND=host-process-test-double, no isolation) runs containers today";

impl Backend {
    /// The backend `XENVGPU_SHIM_BACKEND` names (default: the Xen zone backend).
    pub fn from_env() -> Result<Backend, String> {
        match std::env::var(BACKEND_ENV).as_deref() {
            Ok(HOST_DOUBLE) => Ok(Backend::HostDouble(HostProcessBackend::new())),
            Ok("xen") | Ok("") | Err(std::env::VarError::NotPresent) => Ok(Backend::Xen),
            Ok(other) => Err(format!("{BACKEND_ENV}={other}: unknown backend (xen, {HOST_DOUBLE})")),
            Err(e) => Err(format!("{BACKEND_ENV}: {e}")),
        }
    }
}

impl ZoneBackend for Backend {
    fn create(
        &self,
        spec: &crate::backend::ContainerSpec,
        on_exit: crate::backend::ExitSink,
    ) -> Result<u32, crate::backend::BackendError> {
        match self {
            Backend::HostDouble(b) => b.create(spec, on_exit),
            Backend::Xen => Err(crate::backend::BackendError::Unsupported(XEN_NOT_YET.into())),
        }
    }
    fn create_exec(
        &self,
        id: &str,
        p: &crate::backend::ProcessSpec,
        on_exit: crate::backend::ExitSink,
    ) -> Result<u32, crate::backend::BackendError> {
        match self {
            Backend::HostDouble(b) => b.create_exec(id, p, on_exit),
            Backend::Xen => Err(crate::backend::BackendError::Unsupported(XEN_NOT_YET.into())),
        }
    }
    fn start(&self, pid: u32) -> Result<(), crate::backend::BackendError> {
        match self {
            Backend::HostDouble(b) => b.start(pid),
            Backend::Xen => Err(crate::backend::BackendError::Unsupported(XEN_NOT_YET.into())),
        }
    }
    fn signal(&self, id: &str, pid: u32, signal: i32, all: bool) -> Result<(), crate::backend::BackendError> {
        match self {
            Backend::HostDouble(b) => b.signal(id, pid, signal, all),
            Backend::Xen => Err(crate::backend::BackendError::Unsupported(XEN_NOT_YET.into())),
        }
    }
    fn close_stdin(&self, pid: u32) -> Result<(), crate::backend::BackendError> {
        match self {
            Backend::HostDouble(b) => b.close_stdin(pid),
            Backend::Xen => Ok(()),
        }
    }
    fn remove(&self, id: &str) -> Result<(), crate::backend::BackendError> {
        match self {
            Backend::HostDouble(b) => b.remove(id),
            Backend::Xen => Ok(()),
        }
    }
    fn shutdown(&self) {
        if let Backend::HostDouble(b) = self {
            b.shutdown()
        }
    }
}

fn timestamp(at: SystemTime) -> Timestamp {
    let d = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32, ..Default::default() }
}

/// The event's topic and its protobuf message.
pub fn to_proto(event: Event) -> (&'static str, Box<dyn MessageDyn>) {
    use containerd_shim::protos::topics::*;
    let exit_fields = |exit: Exit| (exit.status, Some(timestamp(exit.at)).into());
    match event {
        Event::Create { container_id, bundle, stdio, pid } => (
            TASK_CREATE_EVENT_TOPIC,
            Box::new(ev::TaskCreate {
                container_id,
                bundle,
                io: Some(ev::TaskIO {
                    stdin: stdio.stdin,
                    stdout: stdio.stdout,
                    stderr: stdio.stderr,
                    terminal: false,
                    ..Default::default()
                })
                .into(),
                pid,
                ..Default::default()
            }),
        ),
        Event::Start { container_id, pid } => {
            (TASK_START_EVENT_TOPIC, Box::new(ev::TaskStart { container_id, pid, ..Default::default() }))
        }
        Event::ExecAdded { container_id, exec_id } => {
            (TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(ev::TaskExecAdded { container_id, exec_id, ..Default::default() }))
        }
        Event::ExecStarted { container_id, exec_id, pid } => (
            TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(ev::TaskExecStarted { container_id, exec_id, pid, ..Default::default() }),
        ),
        Event::Exit { container_id, id, pid, exit } => {
            let (exit_status, exited_at) = exit_fields(exit);
            (
                TASK_EXIT_EVENT_TOPIC,
                Box::new(ev::TaskExit { container_id, id, pid, exit_status, exited_at, ..Default::default() }),
            )
        }
        Event::Delete { container_id, pid, exit } => {
            let (exit_status, exited_at) = exit_fields(exit);
            let id = container_id.clone();
            (
                TASK_DELETE_EVENT_TOPIC,
                Box::new(ev::TaskDelete { container_id, pid, exit_status, exited_at, id, ..Default::default() }),
            )
        }
    }
}

fn rpc_error(e: TaskError) -> ttrpc::Error {
    let code = match e {
        TaskError::NotFound(_) => Code::NOT_FOUND,
        TaskError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        TaskError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        TaskError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        TaskError::Unimplemented(_) => Code::UNIMPLEMENTED,
        TaskError::Internal(_) => Code::INTERNAL,
    };
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

fn spec_error(e: SpecError) -> TaskError {
    match e {
        SpecError::Unsupported(m) => TaskError::Unimplemented(m),
        other => TaskError::InvalidArgument(other.to_string()),
    }
}

fn unimplemented<T>(what: &str) -> TtrpcResult<T> {
    Err(rpc_error(TaskError::Unimplemented(format!("{what} is not supported by the xenvgpu shim"))))
}

/// The shim: one per pod sandbox (containers of one pod share it through containerd's
/// grouping by the CRI sandbox id).
pub struct Service {
    namespace: String,
    id: String,
    exit: Arc<ExitSignal>,
}

/// The ttrpc task service: a handle on the shim's [`Tasks`].
pub struct TaskService {
    tasks: Arc<Tasks<Backend>>,
    exit: Arc<ExitSignal>,
}

impl containerd_shim::Shim for Service {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service { namespace: args.namespace.clone(), id: args.id.clone(), exit: Arc::new(ExitSignal::default()) }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd runs `start` in the bundle's directory.
        let bundle = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let grouping = spec::grouping(&bundle, &opts.id);
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // After a lost shim: end what the container left and release its mounts. The host
        // double lists its pids in the bundle (the cwd of this action).
        let bundle = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let rootfs = spec::container(&self.id, &bundle, Vec::new(), Stdio::default(), false)
            .map(|c| c.rootfs)
            .unwrap_or_else(|_| bundle.join("rootfs"));
        match host_double::reap_lost(&bundle, &rootfs) {
            Ok(n) => log::info!("delete after a lost shim of {}: {n} process group(s) killed", self.id),
            Err(e) => log::warn!("delete after a lost shim of {}: {e}", self.id),
        }
        Ok(DeleteResponse {
            exit_status: LOST_SHIM_STATUS,
            exited_at: Some(timestamp(SystemTime::now())).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let backend = Backend::from_env().unwrap_or_else(|e| {
            log::error!("{e}; refusing every container");
            Backend::Xen
        });
        let (tx, rx) = mpsc::channel::<Event>();
        let namespace = self.namespace.clone();
        std::thread::spawn(move || {
            for event in rx {
                let (topic, msg) = to_proto(event);
                let ctx = ttrpc::context::Context::default();
                if let Err(e) = publisher.publish(ctx, topic, &namespace, msg) {
                    log::error!("publishing {topic}: {e}");
                }
            }
        });
        TaskService { tasks: Arc::new(Tasks::new(backend, tx)), exit: Arc::clone(&self.exit) }
    }
}

fn mounts(req: &[containerd_shim::protos::types::mount::Mount]) -> Vec<RootfsMount> {
    req.iter()
        .map(|m| RootfsMount { fs_type: m.type_.clone(), source: m.source.clone(), options: m.options.clone() })
        .collect()
}

fn status(s: Status) -> api::Status {
    match s {
        Status::Created => api::Status::CREATED,
        Status::Running => api::Status::RUNNING,
        Status::Stopped => api::Status::STOPPED,
    }
}

impl containerd_shim::Task for TaskService {
    fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return unimplemented("restoring from a checkpoint");
        }
        let stdio = Stdio { stdin: req.stdin.clone(), stdout: req.stdout.clone(), stderr: req.stderr.clone() };
        let spec = spec::container(&req.id, Path::new(&req.bundle), mounts(&req.rootfs), stdio, req.terminal)
            .map_err(|e| rpc_error(spec_error(e)))?;
        let pid = self.tasks.create(&spec).map_err(rpc_error)?;
        Ok(api::CreateTaskResponse { pid, ..Default::default() })
    }

    fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let pid = self.tasks.start(&req.id, &req.exec_id).map_err(rpc_error)?;
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let s = self.tasks.state(&req.id, &req.exec_id).map_err(rpc_error)?;
        Ok(api::StateResponse {
            id: if s.exec_id.is_empty() { s.container_id } else { s.exec_id.clone() },
            bundle: s.bundle,
            pid: s.pid,
            status: status(s.status).into(),
            stdin: s.stdio.stdin,
            stdout: s.stdio.stdout,
            stderr: s.stdio.stderr,
            terminal: false,
            exit_status: s.exit.map_or(0, |e| e.status),
            exited_at: s.exit.map(|e| timestamp(e.at)).into(),
            exec_id: s.exec_id,
            ..Default::default()
        })
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        self.tasks.kill(&req.id, &req.exec_id, req.signal, req.all).map_err(rpc_error)?;
        Ok(api::Empty::default())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let stdio = Stdio { stdin: req.stdin.clone(), stdout: req.stdout.clone(), stderr: req.stderr.clone() };
        let value: serde_json::Value = req
            .spec
            .as_ref()
            .map(|any| serde_json::from_slice(&any.value))
            .transpose()
            .map_err(|e| rpc_error(TaskError::InvalidArgument(format!("the exec's process spec is not JSON: {e}"))))?
            .ok_or_else(|| rpc_error(TaskError::InvalidArgument("an exec needs a process spec".into())))?;
        let process = spec::process(&value, stdio, req.terminal).map_err(|e| rpc_error(spec_error(e)))?;
        self.tasks.exec(&req.id, &req.exec_id, &process).map_err(rpc_error)?;
        Ok(api::Empty::default())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let exit = self.tasks.wait(&req.id, &req.exec_id).map_err(rpc_error)?;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let (pid, exit) = self.tasks.delete(&req.id, &req.exec_id).map_err(rpc_error)?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: Some(timestamp(exit.at)).into(),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let pids = self.tasks.pids(&req.id).map_err(rpc_error)?;
        let processes = pids
            .into_iter()
            .map(|pid| containerd_shim::protos::api::ProcessInfo { pid, ..Default::default() })
            .collect();
        Ok(api::PidsResponse { processes, ..Default::default() })
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        if req.stdin {
            self.tasks.close_stdin(&req.id, &req.exec_id).map_err(rpc_error)?;
        }
        Ok(api::Empty::default())
    }

    fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.tasks.state(&req.id, "").map(|s| s.pid).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        // containerd asks after every delete; the shim stays while the pod has containers.
        if req.now || self.tasks.container_count() == 0 {
            self.tasks.backend().shutdown();
            self.exit.signal();
        }
        Ok(api::Empty::default())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, _req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        unimplemented("a terminal")
    }
    fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        unimplemented("pause")
    }
    fn resume(&self, _ctx: &TtrpcContext, _req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        unimplemented("resume")
    }
    fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        unimplemented("checkpoint")
    }
    fn update(&self, _ctx: &TtrpcContext, _req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        unimplemented("updating resources")
    }
    fn stats(&self, _ctx: &TtrpcContext, _req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        unimplemented("stats")
    }
}
