//! The task state machine of one shim: containers, their init and exec'd processes, the
//! transitions containerd's task API allows, and the events it expects, in its order.
//!
//! ```text
//!  create ──► Created ──start──► Running ──(exit)──► Stopped ──delete──► (gone)
//!                │                                      ▲
//!                └──────────kill / (exit)───────────────┘
//! ```
//!
//! Invariants: a process's exit is recorded once (the backend's [`ExitSink`]) and wakes every
//! `wait`; events are queued under the state lock, so `/tasks/exit` always follows the
//! `/tasks/start` (or `/tasks/exec-started`) of its process even when the process ends at
//! once; a container is deleted only with every process stopped (running exec'd processes
//! are killed first, as runc's shim does); nothing is removed from the table before the
//! backend released it.

use crate::backend::{BackendError, ContainerSpec, ExitSink, ProcessSpec, Stdio, ZoneBackend};
use std::collections::BTreeMap;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// How long `delete` waits for processes it had to kill (a created process that never ran,
/// exec'd processes still running when their container goes).
const KILL_WAIT: Duration = Duration::from_secs(10);

/// A process's state, as containerd's `task.Status` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Created, not yet started.
    Created,
    /// Started and not yet ended.
    Running,
    /// Ended; its exit status is known.
    Stopped,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// Exit status (128 + signal for a signal).
    pub status: u32,
    /// When the shim learned of it.
    pub at: SystemTime,
}

/// An event for containerd, in the order it must be published. The fields are those of
/// containerd's event messages of the same names (`containerd.events.TaskCreate`, …).
#[allow(missing_docs)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `/tasks/create`.
    Create { container_id: String, bundle: String, stdio: Stdio, pid: u32 },
    /// `/tasks/start` (init process).
    Start { container_id: String, pid: u32 },
    /// `/tasks/exec-added`.
    ExecAdded { container_id: String, exec_id: String },
    /// `/tasks/exec-started`.
    ExecStarted { container_id: String, exec_id: String, pid: u32 },
    /// `/tasks/exit`; `id` is the exec id, or the container id for the init process.
    Exit { container_id: String, id: String, pid: u32, exit: Exit },
    /// `/tasks/delete` (init process).
    Delete { container_id: String, pid: u32, exit: Exit },
}

/// Why a task request failed; each maps to the gRPC code containerd turns into its errdefs.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// No such container or process (`NotFound`).
    #[error("{0}")]
    NotFound(String),
    /// The id is taken (`AlreadyExists`).
    #[error("{0}")]
    AlreadyExists(String),
    /// Not in a state that allows it (`FailedPrecondition`).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Malformed request or spec (`InvalidArgument`).
    #[error("{0}")]
    InvalidArgument(String),
    /// Not supported by this shim (`Unimplemented`).
    #[error("{0}")]
    Unimplemented(String),
    /// The zone or the host failed (`Internal`).
    #[error("{0}")]
    Internal(String),
}

impl From<BackendError> for TaskError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Unsupported(m) => TaskError::Unimplemented(m),
            BackendError::Invalid(m) => TaskError::InvalidArgument(m),
            BackendError::Failed(m) => TaskError::Internal(m),
        }
    }
}

/// What `state` reports about a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessState {
    /// Container id.
    pub container_id: String,
    /// Exec id ("" for the init process).
    pub exec_id: String,
    /// The container's bundle.
    pub bundle: String,
    /// The process's pid (in the zone's view).
    pub pid: u32,
    /// Its status.
    pub status: Status,
    /// Its standard streams.
    pub stdio: Stdio,
    /// How it ended, once it has.
    pub exit: Option<Exit>,
}

struct Process {
    pid: u32,
    status: Status,
    exit: Option<Exit>,
    stdio: Stdio,
}

impl Process {
    fn new(pid: u32, stdio: Stdio) -> Self {
        Process { pid, status: Status::Created, exit: None, stdio }
    }
}

struct Container {
    bundle: String,
    init: Process,
    execs: BTreeMap<String, Process>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }
    fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

#[derive(Default)]
struct Table {
    containers: BTreeMap<String, Container>,
}

struct Shared {
    table: Mutex<Table>,
    /// Signalled whenever a process stops.
    stopped: Condvar,
    events: Mutex<Sender<Event>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic in another request leaves the table consistent (every mutation is a
        // single step under the lock): carry on with it.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Queues an event; called with the table locked, so events keep the table's order.
    fn emit(&self, _held: &MutexGuard<'_, Table>, event: Event) {
        let tx = self.events.lock().unwrap_or_else(|p| p.into_inner());
        // The publisher thread is gone only when the shim is exiting.
        let _ = tx.send(event);
    }
    /// Records that the process `exec_id` of `container_id` ended (the backend's sink).
    fn exited(&self, container_id: &str, exec_id: &str, status: u32) {
        let mut table = self.lock();
        let Some(process) = table.containers.get_mut(container_id).and_then(|c| c.process_mut(exec_id)) else {
            return;
        };
        if process.status == Status::Stopped {
            return;
        }
        let exit = Exit { status, at: SystemTime::now() };
        process.status = Status::Stopped;
        process.exit = Some(exit);
        let pid = process.pid;
        let id = if exec_id.is_empty() { container_id.to_owned() } else { exec_id.to_owned() };
        self.emit(&table, Event::Exit { container_id: container_id.to_owned(), id, pid, exit });
        drop(table);
        self.stopped.notify_all();
    }
}

/// The shim's containers and processes over one [`ZoneBackend`].
pub struct Tasks<B: ZoneBackend> {
    backend: B,
    shared: Arc<Shared>,
}

fn not_found(container_id: &str, exec_id: &str) -> TaskError {
    if exec_id.is_empty() {
        TaskError::NotFound(format!("container {container_id} not found"))
    } else {
        TaskError::NotFound(format!("process {exec_id} of container {container_id} not found"))
    }
}

impl<B: ZoneBackend> Tasks<B> {
    /// A shim with no containers; its events go to `events`, in order.
    pub fn new(backend: B, events: Sender<Event>) -> Self {
        Tasks {
            backend,
            shared: Arc::new(Shared {
                table: Mutex::new(Table::default()),
                stopped: Condvar::new(),
                events: Mutex::new(events),
            }),
        }
    }

    /// The backend (for the service's requests that bypass the state machine).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn sink(&self, container_id: &str, exec_id: &str) -> ExitSink {
        let shared = Arc::clone(&self.shared);
        let (c, e) = (container_id.to_owned(), exec_id.to_owned());
        Box::new(move |status| shared.exited(&c, &e, status))
    }

    /// Creates a container and its init process (not yet running).
    pub fn create(&self, spec: &ContainerSpec) -> Result<u32, TaskError> {
        if spec.id.is_empty() {
            return Err(TaskError::InvalidArgument("a container needs an id".into()));
        }
        // The lock is held across the backend's create so that a second create of the same
        // id cannot race it and the exit sink, should the process die at once, finds it.
        let mut table = self.shared.lock();
        if table.containers.contains_key(&spec.id) {
            return Err(TaskError::AlreadyExists(format!("container {} already exists", spec.id)));
        }
        let bundle = spec.bundle.display().to_string();
        let stdio = spec.process.stdio.clone();
        // The sink needs the lock this thread holds: an early exit waits for the entry.
        let pid = self.backend.create(spec, self.sink(&spec.id, ""))?;
        table.containers.insert(
            spec.id.clone(),
            Container { bundle: bundle.clone(), init: Process::new(pid, stdio.clone()), execs: BTreeMap::new() },
        );
        self.shared.emit(&table, Event::Create { container_id: spec.id.clone(), bundle, stdio, pid });
        Ok(pid)
    }

    /// Adds a process to the running container `container_id` (not yet running).
    pub fn exec(&self, container_id: &str, exec_id: &str, process: &ProcessSpec) -> Result<(), TaskError> {
        if exec_id.is_empty() {
            return Err(TaskError::InvalidArgument("an exec needs an exec id".into()));
        }
        let mut table = self.shared.lock();
        let container = table.containers.get(container_id).ok_or_else(|| not_found(container_id, ""))?;
        if container.execs.contains_key(exec_id) {
            return Err(TaskError::AlreadyExists(format!(
                "process {exec_id} of container {container_id} already exists"
            )));
        }
        if container.init.status != Status::Running {
            return Err(TaskError::FailedPrecondition(format!("container {container_id} is not running")));
        }
        let pid = self.backend.create_exec(container_id, process, self.sink(container_id, exec_id))?;
        let container = table.containers.get_mut(container_id).expect("checked above, lock held");
        container.execs.insert(exec_id.to_owned(), Process::new(pid, process.stdio.clone()));
        self.shared
            .emit(&table, Event::ExecAdded { container_id: container_id.to_owned(), exec_id: exec_id.to_owned() });
        Ok(())
    }

    /// Starts a created process; returns its pid.
    pub fn start(&self, container_id: &str, exec_id: &str) -> Result<u32, TaskError> {
        let mut table = self.shared.lock();
        let container = table.containers.get_mut(container_id).ok_or_else(|| not_found(container_id, ""))?;
        if !exec_id.is_empty() && container.init.status != Status::Running {
            return Err(TaskError::FailedPrecondition(format!("container {container_id} is not running")));
        }
        let process = container.process_mut(exec_id).ok_or_else(|| not_found(container_id, exec_id))?;
        match process.status {
            Status::Created => {}
            Status::Running => return Err(TaskError::FailedPrecondition("the process is already running".into())),
            Status::Stopped => return Err(TaskError::FailedPrecondition("the process has already ended".into())),
        }
        let pid = process.pid;
        self.backend.start(pid)?;
        process.status = Status::Running;
        let event = if exec_id.is_empty() {
            Event::Start { container_id: container_id.to_owned(), pid }
        } else {
            Event::ExecStarted { container_id: container_id.to_owned(), exec_id: exec_id.to_owned(), pid }
        };
        self.shared.emit(&table, event);
        Ok(pid)
    }

    /// A process's state.
    pub fn state(&self, container_id: &str, exec_id: &str) -> Result<ProcessState, TaskError> {
        let table = self.shared.lock();
        let container = table.containers.get(container_id).ok_or_else(|| not_found(container_id, ""))?;
        let p = container.process(exec_id).ok_or_else(|| not_found(container_id, exec_id))?;
        Ok(ProcessState {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            bundle: container.bundle.clone(),
            pid: p.pid,
            status: p.status,
            stdio: p.stdio.clone(),
            exit: p.exit,
        })
    }

    /// Sends a signal to a process (with `all`, to every process of the container).
    pub fn kill(&self, container_id: &str, exec_id: &str, signal: u32, all: bool) -> Result<(), TaskError> {
        let signal = i32::try_from(signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| TaskError::InvalidArgument(format!("signal {signal} is not a signal number")))?;
        let table = self.shared.lock();
        let container = table.containers.get(container_id).ok_or_else(|| not_found(container_id, ""))?;
        let p = container.process(exec_id).ok_or_else(|| not_found(container_id, exec_id))?;
        if p.status == Status::Stopped && !(all && exec_id.is_empty()) {
            // containerd reads NotFound as "already finished" and carries on.
            return Err(TaskError::NotFound(format!("process {} already finished", p.pid)));
        }
        let pid = p.pid;
        drop(table);
        self.backend.signal(container_id, pid, signal, all)?;
        Ok(())
    }

    /// Closes a process's standard input.
    pub fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), TaskError> {
        let pid = self.state(container_id, exec_id)?.pid;
        Ok(self.backend.close_stdin(pid)?)
    }

    /// Waits until a process has ended; returns how.
    pub fn wait(&self, container_id: &str, exec_id: &str) -> Result<Exit, TaskError> {
        let mut table = self.shared.lock();
        loop {
            let container = table.containers.get(container_id).ok_or_else(|| not_found(container_id, ""))?;
            let p = container.process(exec_id).ok_or_else(|| not_found(container_id, exec_id))?;
            if let Some(exit) = p.exit {
                return Ok(exit);
            }
            table = self.shared.stopped.wait(table).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Kills the given processes unless stopped and waits (bounded) until they are.
    fn kill_and_wait(&self, container_id: &str, exec_ids: &[String]) -> Result<(), TaskError> {
        let deadline = std::time::Instant::now() + KILL_WAIT;
        let mut table = self.shared.lock();
        for exec_id in exec_ids {
            let Some(p) = table.containers.get(container_id).and_then(|c| c.process(exec_id)) else { continue };
            if p.status != Status::Stopped {
                let pid = p.pid;
                if let Err(e) = self.backend.signal(container_id, pid, nix::libc::SIGKILL, false) {
                    log::warn!("killing process {pid} of container {container_id}: {e}");
                }
            }
        }
        loop {
            let c = table.containers.get(container_id).ok_or_else(|| not_found(container_id, ""))?;
            let alive = exec_ids.iter().filter_map(|e| c.process(e)).filter(|p| p.status != Status::Stopped).count();
            if alive == 0 {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(TaskError::Internal(format!(
                    "{alive} process(es) of container {container_id} did not end within {KILL_WAIT:?} of SIGKILL"
                )));
            }
            table = self.shared.stopped.wait_timeout(table, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Deletes a stopped process (and, for the init process, the container); returns the
    /// deleted process's pid and exit. A created process that never ran is killed first, and
    /// so are the container's exec'd processes when its init process is deleted.
    pub fn delete(&self, container_id: &str, exec_id: &str) -> Result<(u32, Exit), TaskError> {
        {
            let table = self.shared.lock();
            let container = table.containers.get(container_id).ok_or_else(|| not_found(container_id, ""))?;
            let p = container.process(exec_id).ok_or_else(|| not_found(container_id, exec_id))?;
            if p.status == Status::Running {
                return Err(TaskError::FailedPrecondition(format!(
                    "process {} is still running: kill it first",
                    p.pid
                )));
            }
        }
        let victims: Vec<String> = if exec_id.is_empty() {
            let table = self.shared.lock();
            let c = table.containers.get(container_id).ok_or_else(|| not_found(container_id, ""))?;
            std::iter::once(String::new()).chain(c.execs.keys().cloned()).collect()
        } else {
            vec![exec_id.to_owned()]
        };
        self.kill_and_wait(container_id, &victims)?;
        let mut table = self.shared.lock();
        let container = table.containers.get_mut(container_id).ok_or_else(|| not_found(container_id, ""))?;
        if !exec_id.is_empty() {
            let p = container.execs.remove(exec_id).ok_or_else(|| not_found(container_id, exec_id))?;
            let exit = p.exit.expect("stopped processes have an exit");
            return Ok((p.pid, exit));
        }
        // Release the container's mounts before forgetting it: if that fails the container
        // stays, and a retried delete (or the shim's delete after a lost shim) tries again.
        self.backend.remove(container_id)?;
        let container = table.containers.remove(container_id).expect("looked up above, lock held");
        let (pid, exit) = (container.init.pid, container.init.exit.expect("stopped processes have an exit"));
        self.shared.emit(&table, Event::Delete { container_id: container_id.to_owned(), pid, exit });
        Ok((pid, exit))
    }

    /// The pids of a container's processes that have not ended.
    pub fn pids(&self, container_id: &str) -> Result<Vec<u32>, TaskError> {
        let table = self.shared.lock();
        let c = table.containers.get(container_id).ok_or_else(|| not_found(container_id, ""))?;
        Ok(std::iter::once(&c.init)
            .chain(c.execs.values())
            .filter(|p| p.status != Status::Stopped)
            .map(|p| p.pid)
            .collect())
    }

    /// How many containers the shim holds (it may exit when none is left).
    pub fn container_count(&self) -> usize {
        self.shared.lock().containers.len()
    }
}
