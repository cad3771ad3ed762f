//! The shim under a real containerd (Debian's `containerd` package, 1.6): a private daemon
//! with the shim on its PATH and the host-process test double as backend, a small image built
//! here from busybox (no registry is reachable) and imported, then `ctr` as a user runs it.
//!
//! Needs root, `containerd`, `ctr`, `tar`, `sha256sum` and a static busybox. Where any is
//! missing the test says so and passes, unless `XENVGPU_REQUIRE_CONTAINERD` is set (CI sets
//! it, after installing them), when it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const RUNTIME: &str = "io.containerd.xenvgpu.v2";
const IMAGE: &str = "localhost/xenvgpu/busybox:test";
const NS: &str = "xenvgpu-test";

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn static_busybox() -> Option<PathBuf> {
    let out = Command::new("sh").args(["-c", "command -v busybox"]).output().ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    let file = Command::new("file").arg("-L").arg(&path).output().ok();
    // Without `file`, trust Debian's busybox-static, which is what CI installs.
    let is_static = file.map(|f| String::from_utf8_lossy(&f.stdout).contains("statically linked")).unwrap_or(true);
    (path.is_file() && is_static).then_some(path)
}

/// Why the test cannot run here, if it cannot.
fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    for cmd in ["containerd", "ctr", "tar", "sha256sum"] {
        if !have(cmd) {
            return Some(format!("no `{cmd}`"));
        }
    }
    static_busybox().is_none().then(|| "no static busybox (Debian: busybox-static)".into())
}

fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn sha256(path: &Path) -> String {
    let out = sh(Command::new("sha256sum").arg(path));
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

/// Writes `bytes` as a blob of the OCI layout at `oci`; returns (digest, size).
fn blob(oci: &Path, file: &Path) -> (String, u64) {
    let digest = sha256(file);
    std::fs::copy(file, oci.join("blobs/sha256").join(&digest)).unwrap();
    (format!("sha256:{digest}"), std::fs::metadata(file).unwrap().len())
}

/// An OCI image archive with a static busybox and its applets, named [`IMAGE`].
fn build_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("image-rootfs");
    let oci = dir.join("oci");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::create_dir_all(rootfs.join("tmp")).unwrap();
    std::fs::create_dir_all(oci.join("blobs/sha256")).unwrap();
    std::fs::copy(static_busybox().unwrap(), rootfs.join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "sleep", "cat", "id", "pwd", "env", "true"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let layer = dir.join("layer.tar");
    sh(Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg("."));
    let (layer_digest, layer_size) = blob(&oci, &layer);
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
        ),
    )
    .unwrap();
    let (config_digest, config_size) = blob(&oci, &config);
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{layer_size}}}]}}"#
        ),
    )
    .unwrap();
    let (manifest_digest, manifest_size) = blob(&oci, &manifest);
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        oci.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{manifest_size},"annotations":{{"io.containerd.image.name":"{IMAGE}","org.opencontainers.image.ref.name":"test"}}}}]}}"#
        ),
    )
    .unwrap();
    let archive = dir.join("image.tar");
    sh(Command::new("tar").arg("-C").arg(&oci).arg("-cf").arg(&archive).arg("."));
    archive
}

/// A private containerd; stopped, its shims killed and its mounts and files removed on drop.
struct Daemon {
    dir: PathBuf,
    child: Child,
}

impl Daemon {
    fn start(dir: &Path) -> Daemon {
        let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-xenvgpu-v2"));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(&shim, bin.join("containerd-shim-xenvgpu-v2")).unwrap();
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env("PATH", path)
            .env("XENVGPU_SHIM_BACKEND", "host-process-test-double")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let daemon = Daemon { dir: dir.to_owned(), child };
        let deadline = Instant::now() + Duration::from_secs(30);
        while daemon.ctr(&["version"]).status.code() != Some(0) {
            assert!(Instant::now() < deadline, "containerd did not come up: {}", daemon.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr` against this daemon (bounded: a hung call fails the test, it does not hang it).
    fn ctr_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let sock = self.dir.join("containerd.sock");
        let mut child = Command::new("timeout")
            .args(["60", "ctr", "-a"])
            .arg(&sock)
            .args(["-n", NS])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut input = child.stdin.take().unwrap();
            let _ = input.write_all(stdin);
        }
        child.wait_with_output().unwrap()
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_with_stdin(args, b"")
    }

    /// `ctr` that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(out.status.success(), "ctr {args:?}: {}\n{}", String::from_utf8_lossy(&out.stderr), self.log());
        String::from_utf8(out.stdout).unwrap()
    }

    /// The shims this daemon started (their command line names its socket).
    fn shims(&self) -> Vec<i32> {
        let sock = self.dir.join("containerd.sock").display().to_string();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("containerd-shim-xenvgpu-v2") && cmdline.contains(&sock) {
                pids.push(pid);
            }
        }
        pids
    }

    fn task_status(&self, id: &str) -> Option<String> {
        let list = self.ok(&["task", "ls"]);
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_owned)
    }

    fn mounts_under_dir(&self) -> usize {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        mounts.lines().filter(|l| l.contains(&*self.dir.display().to_string())).count()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for pid in self.shims() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let dir = self.dir.display().to_string();
        let mut points: Vec<&str> =
            mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|m| m.starts_with(&dir)).collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn alive(pid: i32) -> bool {
    // A zombie counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
}

#[test]
fn ctr_runs_containers_through_the_shim() {
    if let Some(why) = missing() {
        assert!(
            std::env::var_os("XENVGPU_REQUIRE_CONTAINERD").is_none(),
            "XENVGPU_REQUIRE_CONTAINERD is set but {why}"
        );
        eprintln!("SKIPPED: the containerd test needs root, containerd, ctr and a static busybox: {why}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("xenvgpu-containerd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let archive = build_image(&dir);
    let d = Daemon::start(&dir);
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
