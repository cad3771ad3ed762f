//! What the containerd and CRI tests share: preconditions, the busybox image built here, a
//! private containerd and `ctr` against it.
#![allow(dead_code)] // each test file uses its part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const RUNTIME: &str = "io.containerd.xenvgpu.v2";
pub const IMAGE: &str = "localhost/xenvgpu/busybox:test";
/// The containerd namespace `ctr` uses (CRI's is `k8s.io`).
pub const NS: &str = "xenvgpu-test";
/// CRI's namespace.
pub const CRI_NS: &str = "k8s.io";

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn static_busybox() -> Option<PathBuf> {
    let out = Command::new("sh").args(["-c", "command -v busybox"]).output().ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    let file = Command::new("file").arg("-L").arg(&path).output().ok();
    // Without `file`, trust Debian's busybox-static, which is what CI installs.
    let is_static = file.map(|f| String::from_utf8_lossy(&f.stdout).contains("statically linked")).unwrap_or(true);
    (path.is_file() && is_static).then_some(path)
}

/// Why the test cannot run here, if it cannot.
pub fn missing() -> Option<String> {
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

/// Whether the test can run here; where it cannot it says why and the test passes, unless
/// `XENVGPU_REQUIRE_CONTAINERD` is set (CI, as root, after installing what it needs).
pub fn ready() -> bool {
    let Some(why) = missing() else { return true };
    assert!(std::env::var_os("XENVGPU_REQUIRE_CONTAINERD").is_none(), "XENVGPU_REQUIRE_CONTAINERD is set but {why}");
    eprintln!("SKIPPED: needs root, containerd, ctr and a static busybox: {why}");
    false
}

/// A fresh directory for one test.
pub fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xenvgpu-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn sh(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

pub fn sha256(path: &Path) -> String {
    let out = sh(Command::new("sha256sum").arg(path));
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

/// Writes `bytes` as a blob of the OCI layout at `oci`; returns (digest, size).
pub fn blob(oci: &Path, file: &Path) -> (String, u64) {
    let digest = sha256(file);
    std::fs::copy(file, oci.join("blobs/sha256").join(&digest)).unwrap();
    (format!("sha256:{digest}"), std::fs::metadata(file).unwrap().len())
}

/// An OCI image archive with a static busybox and its applets, named [`IMAGE`].
pub fn build_image(dir: &Path) -> PathBuf {
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
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sleep","1000000"]}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
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
pub struct Daemon {
    pub dir: PathBuf,
    child: Child,
    ns: &'static str,
}

impl Daemon {
    /// Starts containerd in `dir`; with `cri`, its CRI plugin too (runtime handler
    /// `xenvgpu`, the test image as the sandbox image, no CNI: host-network pods only).
    pub fn start(dir: &Path, cri: bool) -> Daemon {
        let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-xenvgpu-v2"));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(&shim, bin.join("containerd-shim-xenvgpu-v2")).unwrap();
        let config = dir.join("config.toml");
        let d = dir.display();
        let mut text = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n"
        );
        if cri {
            std::fs::create_dir_all(dir.join("cni-conf")).unwrap();
            std::fs::create_dir_all(dir.join("cni-bin")).unwrap();
            text += &format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{IMAGE}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"{d}/cni-bin\"\n  conf_dir = \"{d}/cni-conf\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  default_runtime_name = \"xenvgpu\"\n"
            );
            // The runtime's section exactly as the repository ships it for nodes.
            let snippet = include_str!("../../../deploy/containerd/xenvgpu-runtime.toml");
            assert!(snippet.contains(RUNTIME), "the shipped snippet names {RUNTIME}");
            text += &snippet.lines().filter(|l| !l.starts_with("version")).collect::<Vec<_>>().join("\n");
        } else {
            text = format!("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n{text}");
        }
        std::fs::write(&config, text).unwrap();
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
        let daemon = Daemon { dir: dir.to_owned(), child, ns: if cri { CRI_NS } else { NS } };
        let deadline = Instant::now() + Duration::from_secs(30);
        while daemon.ctr(&["version"]).status.code() != Some(0) {
            assert!(Instant::now() < deadline, "containerd did not come up: {}", daemon.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        daemon
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr` against this daemon (bounded: a hung call fails the test, it does not hang it).
    pub fn ctr_with_stdin(&self, args: &[&str], stdin: &[u8]) -> Output {
        let sock = self.dir.join("containerd.sock");
        let mut child = Command::new("timeout")
            .args(["60", "ctr", "-a"])
            .arg(&sock)
            .args(["-n", self.ns])
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

    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_with_stdin(args, b"")
    }

    /// `ctr` that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(out.status.success(), "ctr {args:?}: {}\n{}", String::from_utf8_lossy(&out.stderr), self.log());
        String::from_utf8(out.stdout).unwrap()
    }

    /// The shims this daemon started (their command line names its socket).
    pub fn shims(&self) -> Vec<i32> {
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

    pub fn task_status(&self, id: &str) -> Option<String> {
        let list = self.ok(&["task", "ls"]);
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_owned)
    }

    pub fn mounts_under_dir(&self) -> usize {
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

pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn alive(pid: i32) -> bool {
    // A zombie counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
}
