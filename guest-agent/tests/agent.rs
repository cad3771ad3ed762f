//! The agent as an ordinary process (PID ≠ 1: nothing is mounted, no power-off, no
//! xenstore here): it runs the workload from the command line it is given and exits with
//! the status it would report.

use std::process::{Command, Output};

fn agent(cmdline: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args(["--cmdline", cmdline])
        .env("SHOULD_NOT_LEAK", "1")
        .output()
        .expect("running the agent")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_workloads_exit_status_is_the_agents() {
    let o = agent("console=hvc0 vgpu.run=\"/bin/sh -c exit$IFS\\3\"");
    // The backslash keeps the kernel-style parser from seeing a quote; sh gets `exit$IFS\3`.
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("workload exited with status 3"), "{}", stderr(&o));
}

#[test]
fn a_signal_is_reported_as_128_plus_its_number() {
    let o = agent("vgpu.run=\"/bin/sh -c kill$IFS-9$IFS$$\"");
    assert_eq!(o.status.code(), Some(137), "{}", stderr(&o));
}

#[test]
fn the_workload_gets_only_the_environment_it_is_given() {
    let o = agent("vgpu.env=VGPU_LOG=debug vgpu.run=/usr/bin/env");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("VGPU_LOG=debug") && out.contains("PATH=/usr/bin:/bin"), "{out}");
    assert!(!out.contains("SHOULD_NOT_LEAK"), "the agent's own environment leaked: {out}");
}

#[test]
fn missing_or_bad_workloads_are_fatal_errors_with_a_reason() {
    for (cmdline, says) in [
        ("console=hvc0", "no workload"),
        ("vgpu.run=/nonexistent/program", "starting the workload /nonexistent/program"),
        ("vgpu.run=relative", "absolute program path"),
    ] {
        let o = agent(cmdline);
        assert_eq!(o.status.code(), Some(125), "{cmdline}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{cmdline}: {}", stderr(&o));
        assert!(stderr(&o).contains("fatal"), "{cmdline}: {}", stderr(&o));
    }
}

#[test]
fn as_poweroff_it_never_signals_another_systems_init() {
    let dir = std::env::temp_dir().join(format!("vgpu-agent-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("poweroff");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_guest-agent"), &link).unwrap();
    let o = Command::new(&link).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("not running under the guest agent"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}
