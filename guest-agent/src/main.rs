//! The guest agent: PID 1 of a xen-vgpu zone.
//!
//! It mounts proc, sys, devtmpfs and the tmpfs folders; opens xenstore; starts the
//! workload named on the kernel command line (`vgpu.run=`, see [`cmdline`]) or in the
//! domain's xenstore directory (`vgpu/run`), with its output on the console; reaps every
//! process; reports the workload's exit status under `data/vgpu/` in xenstore; and powers
//! the domain off. PID 1 never just exits (the kernel would panic): a fatal error is
//! printed and reported, then the domain powers off, or halts if it cannot.
//!
//! xenstore keys written (relative to `/local/domain/<domid>/`, where a guest may write
//! under `data/`): `data/vgpu/state` = `starting` | `running` | `exited` | `failed`,
//! `data/vgpu/exit-status` = the workload's exit code (128 + signal number when a signal
//! ended it), `data/vgpu/error` = why the agent failed.
//!
//! Shutdown: the image links `/sbin/poweroff`, `/sbin/reboot` and `/sbin/halt` to the agent;
//! the kernel runs them for `xl shutdown`/`xl reboot`, and so invoked the agent sends
//! SIGTERM to PID 1 (only if PID 1 is the agent), which stops the workload (SIGTERM, then
//! SIGKILL after 2 s), reports its exit and powers off.
//!
//! Run as an ordinary process (PID ≠ 1, for tests and debugging) it mounts nothing and
//! exits with the workload's status instead of powering off; `--cmdline TEXT` replaces
//! `/proc/cmdline`.
#![forbid(unsafe_code)]

mod cmdline;
mod report;

use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use report::Reporter;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long the agent waits for `vgpu/run` in xenstore when the command line names no
/// workload (the toolstack may write it right after `xl create`).
const XENSTORE_WORKLOAD_WAIT: Duration = Duration::from_secs(30);
/// How long the agent waits for host-proxy to offer the vgpu device.
const HOST_PROXY_WAIT: Duration = Duration::from_secs(30);
/// How long leftover processes get after SIGTERM before SIGKILL, once the workload ended.
const LEFTOVER_GRACE: Duration = Duration::from_secs(2);

/// Why the agent could not do its job.
#[derive(Debug, thiserror::Error)]
enum AgentError {
    #[error("mounting {what} on {at}: {err}")]
    Mount { what: &'static str, at: &'static str, err: nix::Error },
    #[error("reading the kernel command line: {0}")]
    Cmdline(#[from] cmdline::CmdlineError),
    #[error("reading /proc/cmdline: {0}")]
    ProcCmdline(std::io::Error),
    #[error("no workload: the kernel command line has no vgpu.run= and xenstore has no vgpu/run")]
    NoWorkload,
    #[error("starting the workload {program}: {err}")]
    Spawn { program: String, err: std::io::Error },
    #[error("waiting for the workload: {0}")]
    Wait(nix::Error),
}

fn say(msg: impl std::fmt::Display) {
    // The console is our stderr; a failed write has nowhere better to go.
    eprintln!("vgpu-agent: {msg}");
}

fn main() {
    let pid1 = std::process::id() == 1;
    // The kernel runs /sbin/poweroff or /sbin/reboot (links to this binary) when the
    // toolstack asks the domain to shut down (`xl shutdown`, `xl reboot`): ask PID 1.
    let invoked_as = std::env::args().next().unwrap_or_default();
    if !pid1
        && ["poweroff", "reboot", "halt"].iter().any(|n| invoked_as.ends_with(&format!("/{n}")) || invoked_as == *n)
    {
        // Only when PID 1 is this very agent (never signal another system's init).
        let same = std::fs::read_link("/proc/1/exe").ok() == std::fs::read_link("/proc/self/exe").ok();
        if !same {
            say("not running under the guest agent as PID 1; nothing to do");
            std::process::exit(1);
        }
        let sent = kill(Pid::from_raw(1), Signal::SIGTERM);
        std::process::exit(i32::from(sent.is_err()));
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    // As PID 1 the arguments are the kernel's leftovers (command-line words it did not
    // recognise, such as `noxsave`): ignored, the agent reads /proc/cmdline itself.
    let cmdline_override = match args.as_slice() {
        _ if pid1 => None,
        [flag, text] if flag == "--cmdline" => Some(text.clone()),
        [] => None,
        _ => {
            say("usage: guest-agent [--cmdline TEXT]   (PID 1 of a xen-vgpu guest)");
            std::process::exit(2);
        }
    };
    let mut reporter = Reporter::open();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(pid1, cmdline_override, &mut reporter)));
    let code = match outcome {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            say(format_args!("fatal: {e}"));
            reporter.failed(&e.to_string());
            125
        }
        Err(_) => {
            say("fatal: the agent panicked");
            reporter.failed("the agent panicked");
            125
        }
    };
    if pid1 {
        power_off()
    }
    std::process::exit(code);
}

/// Runs the workload; returns its exit code.
fn run(pid1: bool, cmdline_override: Option<String>, reporter: &mut Reporter) -> Result<i32, AgentError> {
    if pid1 {
        mount_filesystems()?;
        reporter.reopen();
    }
    reporter.set("state", "starting");
    let text = match cmdline_override {
        Some(t) => t,
        None => std::fs::read_to_string("/proc/cmdline").map_err(AgentError::ProcCmdline)?,
    };
    let mut workload = cmdline::parse(&text)?;
    if workload.argv.is_empty() {
        if let Some(run) = reporter.wait_for_workload(XENSTORE_WORKLOAD_WAIT) {
            workload.argv = cmdline::split_run(&run)?;
        }
    }
    if workload.argv.is_empty() {
        return Err(AgentError::NoWorkload);
    }
    // The channel to host-proxy: each CUDA process of the workload claims its own device
    // slot (libvgpu's Xen frontend); the agent makes sure the backend is there first, so a
    // missing host-proxy is reported here, once, rather than as cuInit failures.
    let mut env = workload.env.clone();
    if reporter.has_xenstore() {
        match reporter.wait_for_host_proxy(HOST_PROXY_WAIT) {
            Ok(n) => {
                say(format_args!("host-proxy offers {n} vgpu device slot(s)"));
                reporter.set("channel", "ready");
            }
            Err(e) => {
                say(format_args!("warning: {e}; CUDA calls will fail with CUDA_ERROR_NO_DEVICE"));
                reporter.set("channel", "unavailable");
            }
        }
        if !env.iter().any(|(k, _)| k == "VGPU_TRANSPORT") {
            env.push(("VGPU_TRANSPORT".into(), "xen".into()));
        }
    }
    say(format_args!("starting {}", workload.argv.join(" ")));
    let started = Instant::now();
    let child = Command::new(&workload.argv[0])
        .args(&workload.argv[1..])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", "/root")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .spawn()
        .map_err(|err| AgentError::Spawn { program: workload.argv[0].clone(), err })?;
    reporter.set("state", "running");
    let workload_pid = Pid::from_raw(child.id() as i32);
    if pid1 {
        forward_shutdown(workload_pid);
    }
    let code = reap_until(workload_pid, pid1)?;
    say(format_args!("workload exited with status {code} after {:.2} s", started.elapsed().as_secs_f64()));
    reporter.exited(code);
    Ok(code)
}

/// A shutdown request (SIGTERM to PID 1, from `/sbin/poweroff` run by the kernel for
/// `xl shutdown`) ends the workload: SIGTERM, then SIGKILL after [`LEFTOVER_GRACE`]. The
/// workload's exit is then reported as usual and the domain powers off. SIGTERM is blocked
/// in PID 1's threads (after the workload was started with the default mask) and taken by
/// a thread in `sigwait`.
fn forward_shutdown(workload: Pid) {
    use nix::sys::signal::{SigSet, SigmaskHow};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    if nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None).is_err() {
        say("warning: cannot take shutdown requests (sigmask)");
        return;
    }
    let spawned = std::thread::Builder::new().name("shutdown".into()).spawn(move || {
        if set.wait().is_ok() {
            say("shutdown requested: stopping the workload");
            let _ = kill(workload, Signal::SIGTERM);
            std::thread::sleep(LEFTOVER_GRACE);
            let _ = kill(workload, Signal::SIGKILL);
        }
    });
    if spawned.is_err() {
        say("warning: cannot take shutdown requests (thread)");
    }
}

/// The exit code the host sees: the program's, or 128 + the signal that ended it.
fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// Reaps children until `workload` ends (PID 1 adopts every orphan, so it reaps them
/// all); then, as PID 1, ends what the workload left running.
fn reap_until(workload: Pid, pid1: bool) -> Result<i32, AgentError> {
    let code = loop {
        let target = if pid1 { Pid::from_raw(-1) } else { workload };
        match waitpid(target, None) {
            Ok(status) if status.pid() == Some(workload) => {
                if let Some(code) = exit_code(status) {
                    break code;
                }
            }
            Ok(_) => {}
            Err(nix::Error::EINTR) => {}
            Err(e) => return Err(AgentError::Wait(e)),
        }
    };
    if pid1 {
        end_leftovers();
    }
    Ok(code)
}

/// SIGTERM to every other process, a grace period, then SIGKILL; reaps them.
fn end_leftovers() {
    let reap = || loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => {}
        }
    };
    if kill(Pid::from_raw(-1), Signal::SIGTERM).is_err() {
        return; // ESRCH: nothing left
    }
    let deadline = Instant::now() + LEFTOVER_GRACE;
    while Instant::now() < deadline {
        reap();
        if matches!(waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)), Err(nix::Error::ECHILD)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    reap();
}

/// One mount: source, target, type, flags, data, whether the agent cannot go on without it.
struct MountSpec(&'static str, &'static str, &'static str, nix::mount::MsFlags, Option<&'static str>, bool);

fn mount_filesystems() -> Result<(), AgentError> {
    use nix::mount::{mount, MsFlags};
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let tmp = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let table = [
        MountSpec("proc", "/proc", "proc", nodev, None, true),
        MountSpec("sysfs", "/sys", "sysfs", nodev, None, true),
        MountSpec("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"), true),
        MountSpec("tmpfs", "/run", "tmpfs", tmp, Some("mode=0755"), false),
        MountSpec("tmpfs", "/tmp", "tmpfs", tmp, Some("mode=1777"), false),
        MountSpec("tmpfs", "/dev/shm", "tmpfs", tmp, Some("mode=1777"), false),
    ];
    for MountSpec(what, at, fstype, flags, data, required) in table {
        let _ = std::fs::create_dir_all(at);
        match mount(Some(what), at, Some(fstype), flags, data) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(err) if required => return Err(AgentError::Mount { what, at, err }),
            Err(err) => say(format_args!("warning: mounting {what} on {at}: {err}")),
        }
    }
    Ok(())
}

/// Powers the domain off; halts for good if that fails. Never returns.
fn power_off() -> ! {
    nix::unistd::sync();
    let err = reboot(RebootMode::RB_POWER_OFF).err();
    say(format_args!("power off failed ({err:?}); halting"));
    let _ = reboot(RebootMode::RB_HALT_SYSTEM);
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        let p = Pid::from_raw(7);
        assert_eq!(exit_code(WaitStatus::Exited(p, 3)), Some(3));
        assert_eq!(exit_code(WaitStatus::Signaled(p, Signal::SIGKILL, false)), Some(137));
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }
}
