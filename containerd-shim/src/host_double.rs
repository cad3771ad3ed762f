//! The host-process backend: a **test double** that runs a container's processes as plain
//! host processes, `chroot`ed into its root filesystem. No zone, no isolation (same kernel,
//! same namespaces, no cgroups): it exists so that the shim's task service, its stdio and
//! signal plumbing and containerd's view of it are tested through a real containerd on a
//! machine without Xen. Never select it on a node (`XENVGPU_SHIM_BACKEND=host-process-test-double`).
//!
//! Process creation mirrors runc's create/start split: `create` forks a child that sets up
//! its session, stdio, root, working directory and credentials and then blocks on a gate
//! pipe; `start` opens the gate and the child `execve`s. Exits come from the shim's reaper
//! (`containerd_shim::monitor`), which reaps every child of the shim.

use crate::backend::{BackendError, ContainerSpec, ExitSink, ProcessSpec, ZoneBackend};
use containerd_shim::monitor::{monitor_subscribe, wait_pid, Topic};
use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{pipe2, ForkResult};
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// `PATH` when the spec's environment has none (runc's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The file in a bundle where the double lists the pids it started, so that a delete after a
/// lost shim ([`reap_lost`]) can end them.
pub const PIDS_FILE: &str = "xenvgpu-host-double.pids";
/// Exit status of a child whose `execve` failed (as a shell reports "not found").
const EXEC_FAILED: i32 = 127;
/// Exit status of a child whose set-up failed or whose gate closed without a start.
const SETUP_FAILED: i32 = 125;

struct Proc {
    container_id: String,
    /// Write end of the start gate, until `start`.
    gate: Option<OwnedFd>,
    /// The pipe feeding the process's stdin from containerd's FIFO, until closed.
    stdin: Arc<Mutex<Option<File>>>,
}

struct ContainerRecord {
    rootfs: PathBuf,
    /// `<bundle>/`[`PIDS_FILE`]: the container's pids, for a delete after a lost shim.
    pids_file: PathBuf,
    /// Whether this backend mounted `rootfs` (and must unmount it).
    mounted: bool,
    pids: Vec<u32>,
}

#[derive(Default)]
struct State {
    procs: HashMap<u32, Proc>,
    containers: HashMap<String, ContainerRecord>,
}

/// The host-process test double (see the module's documentation).
#[derive(Default)]
pub struct HostProcessBackend {
    state: Arc<Mutex<State>>,
}

fn failed(what: &str, e: impl std::fmt::Display) -> BackendError {
    BackendError::Failed(format!("{what}: {e}"))
}

fn cstring(s: impl AsRef<[u8]>, what: &str) -> Result<CString, BackendError> {
    CString::new(s.as_ref()).map_err(|_| BackendError::Invalid(format!("{what} contains a NUL byte")))
}

/// Finds `program` in the container's `PATH` as the process will see it after `chroot`;
/// returns the path inside the container. A link is taken as it is (it is resolved inside
/// the container's root, never on the host).
fn resolve(rootfs: &Path, program: &str, env: &[String]) -> Result<String, BackendError> {
    let is_exec = |inside: &str| -> bool {
        let host = rootfs.join(inside.trim_start_matches('/'));
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => true,
            Ok(m) => m.is_file() && m.permissions().mode() & 0o111 != 0,
            Err(_) => false,
        }
    };
    if program.contains('/') {
        return if is_exec(program) {
            Ok(program.to_owned())
        } else {
            Err(BackendError::Invalid(format!("{program}: no such executable in the container")))
        };
    }
    let path = env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    path.split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
        .find(|p| is_exec(p))
        .ok_or_else(|| BackendError::Invalid(format!("{program}: executable file not found in $PATH")))
}

/// Opens a FIFO containerd made for a process's output: read-write, which never blocks on a
/// FIFO (the reader may come later; output waits in the pipe).
fn open_output(path: &str) -> Result<OwnedFd, BackendError> {
    let (p, flags) = if path.is_empty() { ("/dev/null", OFlag::O_WRONLY) } else { (path, OFlag::O_RDWR) };
    open(p, flags | OFlag::O_CLOEXEC, Mode::empty()).map_err(|e| failed(&format!("opening {p}"), e))
}

/// What the child needs, prepared before `fork` (the child may not allocate).
struct Prepared {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    rootfs: CString,
    cwd: CString,
    uid: u32,
    gid: u32,
    groups: Vec<nix::libc::gid_t>,
}

impl Prepared {
    fn new(rootfs: &Path, p: &ProcessSpec) -> Result<Self, BackendError> {
        let program = resolve(rootfs, &p.args[0], &p.env)?;
        Ok(Prepared {
            program: cstring(&program, "the program's path")?,
            argv: p.args.iter().map(|a| cstring(a, "an argument")).collect::<Result<_, _>>()?,
            envp: p.env.iter().map(|e| cstring(e, "an environment entry")).collect::<Result<_, _>>()?,
            rootfs: cstring(rootfs.as_os_str().as_bytes(), "the root filesystem's path")?,
            cwd: cstring(&p.cwd, "the working directory")?,
            uid: p.uid,
            gid: p.gid,
            groups: p.additional_gids.clone(),
        })
    }
}

/// Writes `msg` to the child's stderr and ends it with `code`.
fn child_fail(msg: &[u8], code: i32) -> ! {
    // SAFETY: write(2) of a live slice; async-signal-safe.
    unsafe { nix::libc::write(2, msg.as_ptr().cast(), msg.len()) };
    // SAFETY: _exit(2) is async-signal-safe and ends the process.
    unsafe { nix::libc::_exit(code) }
}

/// Ends the child with `msg` unless the system call's result `r` is 0 or more.
fn child_check(r: nix::libc::c_int, msg: &[u8]) {
    if r < 0 {
        child_fail(msg, SETUP_FAILED)
    }
}

/// The child's side of `fork`: only async-signal-safe calls on data prepared before it (the
/// pointer arrays are built here, before any call, from the prepared strings; the shim is
/// multi-threaded, so nothing after the fork may allocate or take a lock).
fn child(
    prep: &Prepared,
    argv: &[*const nix::libc::c_char],
    envp: &[*const nix::libc::c_char],
    stdio: [i32; 3],
    gate: i32,
) -> ! {
    use nix::libc;
    // Each call below: a plain system call on descriptors this process owns and on
    // NUL-terminated strings that live in `prep` until execve.
    // SAFETY: as above.
    child_check(unsafe { libc::setsid() }, b"xenvgpu shim: setsid failed\n");
    for (target, fd) in (0..).zip(stdio) {
        // SAFETY: as above.
        child_check(unsafe { libc::dup2(fd, target) }, b"xenvgpu shim: dup2 of stdio failed\n");
    }
    // SAFETY: as above.
    child_check(
        unsafe { libc::chroot(prep.rootfs.as_ptr()) },
        b"xenvgpu shim: chroot into the container's rootfs failed\n",
    );
    // SAFETY: as above.
    child_check(
        unsafe { libc::chdir(prep.cwd.as_ptr()) },
        b"xenvgpu shim: the working directory does not exist in the container\n",
    );
    // SAFETY: as above; `groups` is a live slice of its length.
    child_check(
        unsafe { libc::setgroups(prep.groups.len(), prep.groups.as_ptr()) },
        b"xenvgpu shim: setgroups failed\n",
    );
    // SAFETY: as above.
    child_check(unsafe { libc::setgid(prep.gid) }, b"xenvgpu shim: setgid failed\n");
    // SAFETY: as above.
    child_check(unsafe { libc::setuid(prep.uid) }, b"xenvgpu shim: setuid failed\n");
    let mut byte = 0u8;
    // SAFETY: reads one byte into a live local.
    if unsafe { libc::read(gate, (&raw mut byte).cast(), 1) } != 1 {
        // The shim deleted the process (or died) before starting it.
        child_fail(b"", SETUP_FAILED);
    }
    // SAFETY: NUL-terminated strings in `prep`; `argv` and `envp` end with a null pointer.
    unsafe { libc::execve(prep.program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    child_fail(b"xenvgpu shim: execve failed\n", EXEC_FAILED)
}

impl HostProcessBackend {
    /// A backend with no containers.
    pub fn new() -> Self {
        Self::default()
    }

    fn spawn(
        &self,
        container_id: &str,
        rootfs: &Path,
        p: &ProcessSpec,
        on_exit: ExitSink,
    ) -> Result<u32, BackendError> {
        let prep = Prepared::new(rootfs, p)?;
        let stdout = open_output(&p.stdio.stdout)?;
        let stderr = open_output(&p.stdio.stderr)?;
        let (stdin_child, stdin_feed): (OwnedFd, Option<File>) = if p.stdio.stdin.is_empty() {
            (
                open("/dev/null", OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
                    .map_err(|e| failed("opening /dev/null", e))?,
                None,
            )
        } else {
            let (r, w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| failed("a pipe for stdin", e))?;
            (r, Some(File::from(w)))
        };
        let (gate_r, gate_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| failed("the start gate", e))?;
        // Subscribed before the fork, so the reaper's notice of an early exit is not missed.
        let exits = monitor_subscribe(Topic::Pid).map_err(|e| failed("subscribing to exits", e))?;
        let fds = [stdin_child.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()];
        let argv: Vec<*const nix::libc::c_char> =
            prep.argv.iter().map(|a| a.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        let envp: Vec<*const nix::libc::c_char> =
            prep.envp.iter().map(|e| e.as_ptr()).chain(std::iter::once(std::ptr::null())).collect();
        // SAFETY: the child runs only `child`, which makes async-signal-safe calls on data
        // prepared above and ends in execve or _exit.
        let pid = match unsafe { nix::unistd::fork() }.map_err(|e| failed("fork", e))? {
            ForkResult::Child => child(&prep, &argv, &envp, fds, gate_r.as_raw_fd()),
            ForkResult::Parent { child } => child.as_raw() as u32,
        };
        drop((stdin_child, stdout, stderr, gate_r));
        let stdin = Arc::new(Mutex::new(stdin_feed));
        if !p.stdio.stdin.is_empty() {
            let (fifo, feed) = (p.stdio.stdin.clone(), Arc::clone(&stdin));
            std::thread::spawn(move || copy_stdin(&fifo, &feed));
        }
        // Recorded before the waiter exists, so an exit always finds (and clears) the entry.
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.procs.insert(pid, Proc { container_id: container_id.to_owned(), gate: Some(gate_w), stdin });
            if let Some(c) = st.containers.get_mut(container_id) {
                c.pids.push(pid);
                let listed = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&c.pids_file)
                    .and_then(|mut f| writeln!(f, "{pid}"));
                if let Err(e) = listed {
                    log::warn!("listing pid {pid} in {}: {e}", c.pids_file.display());
                }
            }
        }
        let state = Arc::clone(&self.state);
        let cid = container_id.to_owned();
        std::thread::spawn(move || {
            let status = wait_pid(pid as i32, exits);
            {
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(proc_) = st.procs.remove(&pid) {
                    *proc_.stdin.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                if let Some(c) = st.containers.get_mut(&cid) {
                    c.pids.retain(|p| *p != pid);
                }
            }
            on_exit(u32::try_from(status).unwrap_or(SETUP_FAILED as u32));
        });
        Ok(pid)
    }
}

/// Feeds a process's stdin from containerd's FIFO until either side closes.
fn copy_stdin(fifo: &str, feed: &Mutex<Option<File>>) {
    // Blocks until containerd opens its end for writing.
    let Ok(mut src) = File::open(fifo) else { return };
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut guard = feed.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pipe) = guard.as_mut() else { break };
        if pipe.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    *feed.lock().unwrap_or_else(|p| p.into_inner()) = None;
}

impl ZoneBackend for HostProcessBackend {
    fn create(&self, spec: &ContainerSpec, on_exit: ExitSink) -> Result<u32, BackendError> {
        let mut mounted = false;
        if !spec.mounts.is_empty() {
            std::fs::create_dir_all(&spec.rootfs)
                .map_err(|e| failed(&format!("creating {}", spec.rootfs.display()), e))?;
            for m in &spec.mounts {
                containerd_shim::mount::mount_rootfs(Some(&m.fs_type), Some(&m.source), &m.options, &spec.rootfs)
                    .map_err(|e| {
                        failed(&format!("mounting the {} root filesystem at {}", m.fs_type, spec.rootfs.display()), e)
                    })?;
                mounted = true;
            }
        }
        self.state.lock().unwrap_or_else(|p| p.into_inner()).containers.insert(
            spec.id.clone(),
            ContainerRecord {
                rootfs: spec.rootfs.clone(),
                pids_file: spec.bundle.join(PIDS_FILE),
                mounted,
                pids: Vec::new(),
            },
        );
        match self.spawn(&spec.id, &spec.rootfs, &spec.process, on_exit) {
            Ok(pid) => Ok(pid),
            Err(e) => {
                if let Err(u) = self.remove(&spec.id) {
                    log::warn!("cleaning up after a failed create of {}: {u}", spec.id);
                }
                Err(e)
            }
        }
    }

    fn create_exec(&self, container_id: &str, process: &ProcessSpec, on_exit: ExitSink) -> Result<u32, BackendError> {
        let rootfs = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.containers.get(container_id).map(|c| c.rootfs.clone())
        }
        .ok_or_else(|| BackendError::Invalid(format!("no container {container_id}")))?;
        self.spawn(container_id, &rootfs, process, on_exit)
    }

    fn start(&self, pid: u32) -> Result<(), BackendError> {
        let gate = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.procs.get_mut(&pid).and_then(|p| p.gate.take())
        }
        .ok_or_else(|| BackendError::Invalid(format!("process {pid} is not waiting to start")))?;
        File::from(gate).write_all(&[1]).map_err(|e| failed(&format!("starting process {pid}"), e))
    }

    fn signal(&self, container_id: &str, pid: u32, signal: i32, all: bool) -> Result<(), BackendError> {
        let targets: Vec<i32> = if all {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            // Each process leads its own session and group: signal the groups.
            st.containers.get(container_id).map(|c| c.pids.iter().map(|p| -(*p as i32)).collect()).unwrap_or_default()
        } else {
            vec![pid as i32]
        };
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|e| BackendError::Invalid(format!("signal {signal}: {e}")))?;
        for t in targets {
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(t), sig) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(failed(&format!("signalling {t}"), e)),
            }
        }
        Ok(())
    }

    fn close_stdin(&self, pid: u32) -> Result<(), BackendError> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = st.procs.get(&pid) {
            *p.stdin.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        Ok(())
    }

    fn remove(&self, container_id: &str) -> Result<(), BackendError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = st.containers.get(container_id) else { return Ok(()) };
        if c.mounted {
            unmount(&c.rootfs)?;
        }
        let _ = std::fs::remove_file(&c.pids_file);
        st.containers.remove(container_id);
        st.procs.retain(|_, p| p.container_id != container_id);
        Ok(())
    }

    fn shutdown(&self) {
        let ids: Vec<String> =
            self.state.lock().unwrap_or_else(|p| p.into_inner()).containers.keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.remove(&id) {
                log::warn!("shutting down: {e}");
            }
        }
    }
}

/// After a lost shim (containerd's `delete` action, run in the bundle): SIGKILLs the process
/// groups of the pids the double listed in the bundle whose root is still the container's
/// (a pid reused by an unrelated process is left alone), then unmounts the root filesystem.
/// Returns how many it killed.
pub fn reap_lost(bundle: &Path, rootfs: &Path) -> Result<usize, BackendError> {
    let listed = std::fs::read_to_string(bundle.join(PIDS_FILE)).unwrap_or_default();
    let mut killed = 0;
    for pid in listed.lines().filter_map(|l| l.trim().parse::<i32>().ok()).filter(|p| *p > 1) {
        let root = std::fs::read_link(format!("/proc/{pid}/root"));
        if root.as_deref().ok() != Some(rootfs) {
            continue;
        }
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(-pid), nix::sys::signal::Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    let _ = std::fs::remove_file(bundle.join(PIDS_FILE));
    unmount(rootfs)?;
    Ok(killed)
}

/// Unmounts a container's root filesystem (lazily: a process that still holds it, such as a
/// stray descendant, does not keep the bundle busy). Not mounted is fine.
pub fn unmount(rootfs: &Path) -> Result<(), BackendError> {
    match nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(failed(&format!("unmounting {}", rootfs.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_inside_the_container_and_links_are_not_followed_on_the_host() {
        let root = std::env::temp_dir().join(format!("xenvgpu-resolve-{}", std::process::id()));
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(root.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("bin/data"), b"").unwrap();
        // An absolute link that would point at the host's file if followed here.
        std::os::unix::fs::symlink("/bin/tool", root.join("bin/sh")).unwrap();
        let env = vec!["PATH=/usr/bin:/bin".to_owned()];
        assert_eq!(resolve(&root, "tool", &env).unwrap(), "/bin/tool");
        assert_eq!(resolve(&root, "sh", &env).unwrap(), "/bin/sh");
        assert_eq!(resolve(&root, "/bin/tool", &[]).unwrap(), "/bin/tool");
        assert!(resolve(&root, "data", &env).unwrap_err().to_string().contains("not found in $PATH"));
        assert!(resolve(&root, "missing", &[]).is_err());
        assert!(resolve(&root, "/bin/missing", &[]).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
