//! The shim under a real containerd (Debian's `containerd` package, 1.6): a private daemon
//! with the shim on its PATH and the host-process test double as backend, a small image built
//! here from busybox (no registry is reachable) and imported, then `ctr` as a user runs it.
//!
//! Needs root, `containerd`, `ctr`, `tar`, `sha256sum` and a static busybox. Where any is
//! missing the test says so and passes, unless `XENVGPU_REQUIRE_CONTAINERD` is set (CI sets
//! it, after installing them), when it fails.

mod common;

use common::*;

#[test]
fn ctr_runs_containers_through_the_shim() {
    if !ready() {
        return;
    }
    let dir = test_dir("containerd");
    let archive = build_image(&dir);
    let d = Daemon::start(&dir, false);
    d.ok(&["images", "import", archive.to_str().unwrap()]);
    let run = |extra: &[&str], id: &str, cmd: &[&str]| {
        let mut args = vec!["run", "--runtime", RUNTIME];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[IMAGE, id]);
        args.extend_from_slice(cmd);
        d.ctr(&args)
    };

    // Output, environment, working directory and the exit status (ctr 1.6's `run` has no
    // --user; the exec below sets one).
    let out = run(
        &["--rm", "--env", "GREETING=hello", "--cwd", "/tmp"],
        "c1",
        &["/bin/sh", "-c", "echo $GREETING from $(pwd); id -u; echo to-stderr >&2; exit 3"],
    );
    assert_eq!(out.status.code(), Some(3), "{}\n{}", String::from_utf8_lossy(&out.stderr), d.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from /tmp\n0\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"));
    // Found through the image's PATH; a missing program is a clear error at create.
    let out = run(&["--rm"], "c1b", &["true"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["--rm"], "c1c", &["no-such-program"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("executable file not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = d.ctr(&["containers", "rm", "c1c"]);

    // Detached: pids, exec with stdin and its own status, kill with a signal, delete.
    let out = run(&["-d"], "c2", &["/bin/sleep", "600"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.task_status("c2").as_deref(), Some("RUNNING"));
    let ps = d.ok(&["task", "ps", "c2"]);
    let init: i32 =
        ps.lines().nth(1).and_then(|l| l.split_whitespace().next()).and_then(|p| p.parse().ok()).expect("a pid");
    assert!(alive(init));
    let out = d.ctr_with_stdin(
        &["task", "exec", "--exec-id", "e1", "c2", "/bin/sh", "-c", "echo from-exec; cat; exit 5"],
        b"piped-in\n",
    );
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-exec\npiped-in\n");
    let out = d.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        "--user",
        "1000",
        "--cwd",
        "/bin",
        "c2",
        "/bin/sh",
        "-c",
        "id -u; pwd",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1000\n/bin\n");
    d.ok(&["task", "kill", "-s", "SIGTERM", "c2"]);
    wait_until("c2 stopped", || d.task_status("c2").as_deref() == Some("STOPPED"));
    assert!(!alive(init));
    let out = d.ctr(&["task", "rm", "c2"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exit code 143"), "{}", String::from_utf8_lossy(&out.stderr));
    d.ok(&["containers", "rm", "c2"]);
    wait_until("c2's shim exited", || d.shims().is_empty());
    assert_eq!(d.mounts_under_dir(), 0, "c2's root filesystem is still mounted");

    // Two containers of one pod share one shim, which stays until the last is deleted.
    for id in ["a1", "a2"] {
        let out = run(&["-d", "--annotation", "io.kubernetes.cri.sandbox-id=pod-a"], id, &["/bin/sleep", "600"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(d.shims().len(), 1, "one shim per pod");
    for (i, id) in ["a1", "a2"].iter().enumerate() {
        d.ok(&["task", "kill", "-s", "SIGKILL", id]);
        wait_until("stopped", || d.task_status(id).as_deref() == Some("STOPPED"));
        d.ok(&["task", "rm", id]);
        d.ok(&["containers", "rm", id]);
        if i == 0 {
            assert_eq!(d.shims().len(), 1, "the pod's shim stays while a container is left");
            assert_eq!(d.task_status("a2").as_deref(), Some("RUNNING"));
        }
    }
    wait_until("the pod's shim exited", || d.shims().is_empty());

    // A lost shim: containerd's cleanup (the shim's `delete` action) ends what it left.
    let out = run(&["-d"], "c3", &["/bin/sleep", "600"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ps = d.ok(&["task", "ps", "c3"]);
    let orphan: i32 =
        ps.lines().nth(1).and_then(|l| l.split_whitespace().next()).and_then(|p| p.parse().ok()).expect("a pid");
    let shims = d.shims();
    assert_eq!(shims.len(), 1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shims[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("the lost shim's container process is gone", || !alive(orphan));
    wait_until("the lost shim's task is gone", || d.task_status("c3").is_none());
    wait_until("the lost shim's mounts are released", || d.mounts_under_dir() == 0);
    let _ = d.ctr(&["containers", "rm", "c3"]);
}
