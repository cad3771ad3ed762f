//! The task state machine against a fake zone backend: transitions, errors by kind, events
//! in containerd's order, exits from other threads.

use containerd_shim_xenvgpu::backend::{
    BackendError, ContainerSpec, ExitSink, PodIdentity, ProcessSpec, Stdio, ZoneBackend,
};
use containerd_shim_xenvgpu::tasks::{Event, Status, TaskError, Tasks};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct FakeState {
    next_pid: u32,
    sinks: HashMap<u32, ExitSink>,
    calls: Vec<String>,
    fail_create: bool,
    /// A started process ends at once with this status (from another thread).
    exit_on_start: Option<u32>,
}

/// A zone that runs nothing: it hands out pids, records calls, and ends processes when the
/// test (or a SIGKILL) says so, always from another thread, as a real zone's exits arrive.
#[derive(Clone, Default)]
struct FakeZone(Arc<Mutex<FakeState>>);

impl FakeZone {
    fn exit(&self, pid: u32, status: u32) {
        let sink = self.0.lock().unwrap().sinks.remove(&pid).expect("a live process");
        std::thread::spawn(move || sink(status)).join().unwrap();
    }
    fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().calls.clone()
    }
    fn new_pid(&self, on_exit: ExitSink) -> u32 {
        let mut st = self.0.lock().unwrap();
        st.next_pid += 1;
        let pid = 100 + st.next_pid;
        st.sinks.insert(pid, on_exit);
        pid
    }
}

impl ZoneBackend for FakeZone {
    fn create(&self, spec: &ContainerSpec, on_exit: ExitSink) -> Result<u32, BackendError> {
        if self.0.lock().unwrap().fail_create {
            return Err(BackendError::Failed("the zone did not boot".into()));
        }
        self.0.lock().unwrap().calls.push(format!("create {}", spec.id));
        Ok(self.new_pid(on_exit))
    }
    fn create_exec(&self, id: &str, p: &ProcessSpec, on_exit: ExitSink) -> Result<u32, BackendError> {
        self.0.lock().unwrap().calls.push(format!("exec {id} {}", p.args[0]));
        Ok(self.new_pid(on_exit))
    }
    fn start(&self, pid: u32) -> Result<(), BackendError> {
        let mut st = self.0.lock().unwrap();
        st.calls.push(format!("start {pid}"));
        if let Some(status) = st.exit_on_start {
            let sink = st.sinks.remove(&pid).unwrap();
            // Ends before the state machine has recorded the start: the sink must wait.
            std::thread::spawn(move || sink(status));
        }
        Ok(())
    }
    fn signal(&self, id: &str, pid: u32, signal: i32, all: bool) -> Result<(), BackendError> {
        let mut st = self.0.lock().unwrap();
        st.calls.push(format!("signal {id} {pid} {signal} all={all}"));
        if signal == 9 {
            if let Some(sink) = st.sinks.remove(&pid) {
                std::thread::spawn(move || sink(128 + 9));
            }
        }
        Ok(())
    }
    fn close_stdin(&self, pid: u32) -> Result<(), BackendError> {
        self.0.lock().unwrap().calls.push(format!("close-stdin {pid}"));
        Ok(())
    }
    fn remove(&self, id: &str) -> Result<(), BackendError> {
        self.0.lock().unwrap().calls.push(format!("remove {id}"));
        Ok(())
    }
    fn shutdown(&self) {}
}

fn process(arg0: &str) -> ProcessSpec {
    ProcessSpec {
        args: vec![arg0.into()],
        env: vec![],
        cwd: "/".into(),
        uid: 0,
        gid: 0,
        additional_gids: vec![],
        stdio: Stdio::default(),
    }
}

fn container(id: &str) -> ContainerSpec {
    ContainerSpec {
        id: id.into(),
        bundle: PathBuf::from(format!("/run/bundles/{id}")),
        rootfs: PathBuf::from(format!("/run/bundles/{id}/rootfs")),
        rootfs_readonly: false,
        mounts: vec![],
        pod: PodIdentity { sandbox_id: id.into(), name: None, uid: None },
        process: process("/app"),
    }
}

fn setup() -> (FakeZone, Tasks<FakeZone>, Receiver<Event>) {
    let zone = FakeZone::default();
    let (tx, rx) = channel();
    (zone.clone(), Tasks::new(zone, tx), rx)
}

/// The events' kinds, without their contents.
fn kinds(rx: &Receiver<Event>) -> Vec<&'static str> {
    rx.try_iter()
        .map(|e| match e {
            Event::Create { .. } => "create",
            Event::Start { .. } => "start",
            Event::ExecAdded { .. } => "exec-added",
            Event::ExecStarted { .. } => "exec-started",
            Event::Exit { .. } => "exit",
            Event::Delete { .. } => "delete",
        })
        .collect()
}

#[test]
fn a_container_runs_to_its_exit_with_events_in_containerds_order() {
    let (zone, tasks, events) = setup();
    let pid = tasks.create(&container("c1")).unwrap();
    assert_eq!(tasks.state("c1", "").unwrap().status, Status::Created);
    assert_eq!(tasks.start("c1", "").unwrap(), pid);
    assert_eq!(tasks.state("c1", "").unwrap().status, Status::Running);
    zone.exit(pid, 3);
    let exit = tasks.wait("c1", "").unwrap();
    assert_eq!(exit.status, 3);
    let st = tasks.state("c1", "").unwrap();
    assert_eq!((st.status, st.exit.map(|e| e.status)), (Status::Stopped, Some(3)));
    assert_eq!(tasks.delete("c1", "").unwrap(), (pid, exit));
    assert_eq!(kinds(&events), ["create", "start", "exit", "delete"]);
    assert_eq!(zone.calls(), ["create c1", &format!("start {pid}"), "remove c1"]);
    assert!(matches!(tasks.state("c1", ""), Err(TaskError::NotFound(_))));
    assert_eq!(tasks.container_count(), 0);
}

#[test]
fn the_exit_event_follows_the_start_even_when_the_process_ends_at_once() {
    for _ in 0..50 {
        let (zone, tasks, events) = setup();
        zone.0.lock().unwrap().exit_on_start = Some(0);
        tasks.create(&container("c1")).unwrap();
        tasks.start("c1", "").unwrap();
        assert_eq!(tasks.wait("c1", "").unwrap().status, 0);
        assert_eq!(kinds(&events), ["create", "start", "exit"]);
    }
}

#[test]
fn wait_blocks_until_the_process_ends_and_every_waiter_wakes() {
    let (zone, tasks, _events) = setup();
    let tasks = Arc::new(tasks);
    let pid = tasks.create(&container("c1")).unwrap();
    tasks.start("c1", "").unwrap();
    let (tx, rx) = channel();
    for _ in 0..3 {
        let (tasks, tx) = (Arc::clone(&tasks), tx.clone());
        std::thread::spawn(move || tx.send(tasks.wait("c1", "").map(|e| e.status).map_err(|e| e.to_string())).unwrap());
    }
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "wait returned before the process ended");
    zone.exit(pid, 128 + 15);
    for _ in 0..3 {
        assert_eq!(rx.recv().unwrap(), Ok(143));
    }
}

#[test]
fn kill_goes_to_the_zone_and_a_finished_process_is_not_found() {
    let (zone, tasks, _events) = setup();
    let pid = tasks.create(&container("c1")).unwrap();
    tasks.start("c1", "").unwrap();
    tasks.kill("c1", "", 15, false).unwrap();
    tasks.kill("c1", "", 15, true).unwrap();
    assert!(zone.calls().contains(&format!("signal c1 {pid} 15 all=false")));
    assert!(zone.calls().contains(&format!("signal c1 {pid} 15 all=true")));
    assert!(matches!(tasks.kill("c1", "", 0, false), Err(TaskError::InvalidArgument(_))));
    assert!(matches!(tasks.kill("c1", "", 65, false), Err(TaskError::InvalidArgument(_))));
    assert!(matches!(tasks.kill("nope", "", 9, false), Err(TaskError::NotFound(_))));
    zone.exit(pid, 143);
    tasks.wait("c1", "").unwrap();
    assert!(matches!(tasks.kill("c1", "", 9, false), Err(TaskError::NotFound(_))));
    // `kill --all` of a stopped init still reaches leftovers in the zone.
    tasks.kill("c1", "", 9, true).unwrap();
}

#[test]
fn a_running_process_is_not_deleted_and_a_created_one_is_killed_first() {
    let (zone, tasks, events) = setup();
    let pid = tasks.create(&container("c1")).unwrap();
    // Created, never started: delete kills it and reports the SIGKILL.
    let (dpid, exit) = tasks.delete("c1", "").unwrap();
    assert_eq!((dpid, exit.status), (pid, 137));
    assert!(zone.calls().contains(&format!("signal c1 {pid} 9 all=false")));
    assert_eq!(kinds(&events), ["create", "exit", "delete"]);

    let pid = tasks.create(&container("c2")).unwrap();
    tasks.start("c2", "").unwrap();
    assert!(matches!(tasks.delete("c2", ""), Err(TaskError::FailedPrecondition(_))));
    assert_eq!(tasks.state("c2", "").unwrap().status, Status::Running);
    zone.exit(pid, 0);
    tasks.delete("c2", "").unwrap();
}

#[test]
fn execs_run_in_a_running_container_and_end_with_it() {
    let (zone, tasks, events) = setup();
    assert!(matches!(tasks.exec("c1", "e1", &process("/sh")), Err(TaskError::NotFound(_))));
    let init = tasks.create(&container("c1")).unwrap();
    assert!(matches!(tasks.exec("c1", "e1", &process("/sh")), Err(TaskError::FailedPrecondition(_))));
    tasks.start("c1", "").unwrap();
    assert!(matches!(tasks.exec("c1", "", &process("/sh")), Err(TaskError::InvalidArgument(_))));
    tasks.exec("c1", "e1", &process("/sh")).unwrap();
    assert!(matches!(tasks.exec("c1", "e1", &process("/sh")), Err(TaskError::AlreadyExists(_))));
    assert_eq!(tasks.state("c1", "e1").unwrap().status, Status::Created);
    let e1 = tasks.start("c1", "e1").unwrap();
    assert!(matches!(tasks.start("c1", "e1"), Err(TaskError::FailedPrecondition(_))));
    let mut pids = tasks.pids("c1").unwrap();
    pids.sort();
    assert_eq!(pids, [init, e1]);
    zone.exit(e1, 7);
    assert_eq!(tasks.wait("c1", "e1").unwrap().status, 7);
    assert_eq!(tasks.pids("c1").unwrap(), [init]);
    assert_eq!(tasks.delete("c1", "e1").unwrap().1.status, 7);
    assert!(matches!(tasks.state("c1", "e1"), Err(TaskError::NotFound(_))));

    // A second exec still running when the init process ends and is deleted: killed first.
    tasks.exec("c1", "e2", &process("/sh")).unwrap();
    let e2 = tasks.start("c1", "e2").unwrap();
    zone.exit(init, 0);
    tasks.wait("c1", "").unwrap();
    tasks.delete("c1", "").unwrap();
    assert!(zone.calls().contains(&format!("signal c1 {e2} 9 all=false")));
    let all: Vec<Event> = events.try_iter().collect();
    let exit_ids: Vec<&str> =
        all.iter().filter_map(|e| if let Event::Exit { id, .. } = e { Some(id.as_str()) } else { None }).collect();
    assert_eq!(exit_ids, ["e1", "c1", "e2"]);
    assert!(matches!(all.last(), Some(Event::Delete { container_id, .. }) if container_id == "c1"));
    assert!(all.iter().any(|e| matches!(e, Event::ExecStarted { exec_id, pid, .. } if exec_id == "e1" && *pid == e1)));
}

#[test]
fn ids_are_unique_unknown_ones_are_not_found_and_a_failed_create_leaves_nothing() {
    let (zone, tasks, events) = setup();
    tasks.create(&container("c1")).unwrap();
    assert!(matches!(tasks.create(&container("c1")), Err(TaskError::AlreadyExists(_))));
    assert!(matches!(tasks.create(&container("")), Err(TaskError::InvalidArgument(_))));
    for r in [tasks.start("x", "").err(), tasks.wait("x", "").err(), tasks.delete("x", "").err(), tasks.pids("x").err()]
    {
        assert!(matches!(r, Some(TaskError::NotFound(_))), "{r:?}");
    }
    assert!(matches!(tasks.state("c1", "nope"), Err(TaskError::NotFound(_))));
    zone.0.lock().unwrap().fail_create = true;
    assert!(matches!(tasks.create(&container("c2")), Err(TaskError::Internal(m)) if m.contains("did not boot")));
    assert_eq!(tasks.container_count(), 1);
    assert_eq!(kinds(&events), ["create"]);
}

#[test]
fn close_io_reaches_the_zone() {
    let (zone, tasks, _events) = setup();
    let pid = tasks.create(&container("c1")).unwrap();
    tasks.close_stdin("c1", "").unwrap();
    assert!(zone.calls().contains(&format!("close-stdin {pid}")));
}
