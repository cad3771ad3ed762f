//! `cargo xtask xen-lab [--shell] [--keep-going] [--timeout SECS] [--scenario NAME]...
//! [--stand-in-guest] [--verbose]`: the project's Xen lab.
//!
//! Boots the real Xen 4.17 hypervisor with a Debian dom0 under QEMU (TCG: no hardware
//! virtualization needed) and, from the dom0's `/init` (`xtask/lab/dom0-init.sh`), starts
//! the Xen toolstack and `host-proxy`, then `xl create`s one guest domain per scenario (the
//! project's guest image from `cargo xtask build-image`), relays its console, and reads the
//! exit status the guest agent left in xenstore. The host side decides PASS/FAIL from the
//! serial console: every scenario's guest must exit with the expected status and print the
//! expected line.
//!
//! * Host tools come from apt (installed when missing, as root).
//! * The Xen hypervisor and the dom0 kernel are Debian packages, downloaded and unpacked
//!   (never installed) once into `~/.cache/xen-vgpu/lab` (`$XEN_VGPU_CACHE/lab` if set).
//! * Everything else is rebuilt on each run in `target/xen-lab/`; the serial console, with
//!   timestamps in seconds since QEMU started, is kept in `target/xen-lab/console.log`.
//! * `--shell` leaves a dom0 shell on the terminal after the scenarios (Ctrl-a x quits QEMU);
//!   `--keep-going` runs the remaining scenarios after one fails; `--stand-in-guest` boots a
//!   busybox guest on Debian's kernel that follows the agent's contract instead of the
//!   project's image, to debug the lab itself.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One guest workload the lab runs and checks.
struct Scenario {
    /// Short name: also names the guest domain (`vgpu-lab-<name>`) and its boot directory.
    name: &'static str,
    /// Programs `build-image` puts into the guest (as `/usr/bin/<basename>`, with libraries).
    apps: &'static [&'static str],
    /// The guest agent's command line.
    run: &'static str,
    /// More guest kernel command line (`vgpu.env=…` for the workload).
    extra: &'static str,
    /// Each CUDA process's data window in MiB (`build-image --window-mib`, which also sizes
    /// the guest's grant table).
    window_mib: u32,
    /// A line the workload must print on the guest console (compared trimmed), if any.
    expect_line: Option<&'static str>,
    /// The exit status the guest agent must report.
    expect_status: i32,
    /// How long dom0 waits for the guest domain to shut down.
    timeout_s: u32,
    /// Name the workload in xenstore (`vgpu/run`, written by dom0 right after `xl create`)
    /// instead of on the kernel command line.
    run_via_xenstore: bool,
    /// When the guest console shows this line, dom0 asks the domain to shut down
    /// (`xl shutdown`); the exit status is checked as usual.
    shutdown_on: Option<&'static str>,
    /// When the guest console shows this line, dom0 destroys the domain (a guest dying
    /// mid-session) and checks that host-proxy ended its zone; exit status is not checked.
    destroy_on: Option<&'static str>,
    /// When the guest console shows this line, dom0 kills host-proxy (SIGKILL) and starts a
    /// new one on the same socket; the guest's exit status and line are checked as usual, and
    /// that no worker of the old daemon was left. Later scenarios run against the new one.
    restart_on: Option<&'static str>,
}

/// What a scenario does unless it says otherwise: a workload on the kernel command line,
/// exit status 0, 64 MiB windows, a minute to finish, no shutdown or destruction.
const BASE: Scenario = Scenario {
    name: "",
    apps: &[],
    run: "",
    extra: "",
    window_mib: 64,
    expect_line: None,
    expect_status: 0,
    timeout_s: 60,
    run_via_xenstore: false,
    shutdown_on: None,
    destroy_on: None,
    restart_on: None,
};

/// A CUDA program scenario: cudarc_app, 32 MiB windows, three minutes.
const CUDA: Scenario = Scenario { apps: &[CUDA_APP], window_mib: 32, timeout_s: 180, ..BASE };

/// The lab's scenarios, run in this order in one boot.
const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "hello",
        apps: &["/bin/echo"],
        run: "/usr/bin/echo vgpu-lab-hello",
        expect_line: Some("vgpu-lab-hello"),
        ..BASE
    },
    Scenario { name: "false", apps: &["/bin/false"], run: "/usr/bin/false", expect_status: 1, ..BASE },
    // An unmodified cudarc program through libvgpu over the Xen ring (grant pages, event
    // channel, xenstore handshake) to host-proxy in dom0 (simulated GPU).
    Scenario {
        name: "cuda",
        run: "/usr/bin/cudarc_app suite",
        extra: "vgpu.env=VGPU_LOG=info",
        expect_line: Some("suite: all scenarios passed"),
        ..CUDA
    },
    // host-proxy killed (SIGKILL) while the guest's program calls it over the Xen ring: the
    // program gets an error (exit status 3), no worker of the old daemon is left, and the
    // daemon started again serves the scenarios after this one.
    Scenario {
        name: "restart",
        run: "/usr/bin/cudarc_app calls-until-gone",
        expect_line: Some("host-gone"),
        expect_status: 3,
        timeout_s: 120,
        restart_on: Some("calling-the-host"),
        ..CUDA
    },
    // The same program's round-trip and copy benchmark over the Xen transport; dom0 runs it
    // over the local transport afterwards for comparison (`VGPU-LAB local-bench`).
    Scenario {
        name: "bench",
        run: "/usr/bin/cudarc_app bench 1000",
        expect_line: Some("ok: 16 MiB came back intact"),
        ..CUDA
    },
    // A guest destroyed while its CUDA program holds device memory; host-proxy must notice
    // (@releaseDomain) and end the zone. Exit status is not checked.
    Scenario {
        name: "die",
        run: "/usr/bin/cudarc_app hold",
        timeout_s: 120,
        destroy_on: Some("holding-gpu-memory"),
        ..CUDA
    },
    // `xl shutdown` while the CUDA program holds a session: the agent stops it (SIGTERM:
    // status 143), reports, powers off; host-proxy ends the zone.
    Scenario {
        name: "shutdown",
        run: "/usr/bin/cudarc_app hold",
        expect_line: Some("holding-gpu-memory"),
        expect_status: 143,
        timeout_s: 120,
        shutdown_on: Some("holding-gpu-memory"),
        ..CUDA
    },
    // A 128 MiB window: 33 000 grants, over the 32 768 of Xen's default grant table, so the
    // guest needs build-image's `max_grant_frames` (and Xen booted with a larger
    // `gnttab_max_frames`, as the lab's is).
    Scenario {
        name: "bigwindow",
        run: "/usr/bin/cudarc_app bench 200",
        window_mib: 128,
        expect_line: Some("ok: 16 MiB came back intact"),
        ..CUDA
    },
    // The workload named in xenstore by the toolstack instead of on the command line.
    Scenario {
        name: "xenstore-run",
        apps: &["/bin/echo"],
        run: "/usr/bin/echo named-in-xenstore",
        expect_line: Some("named-in-xenstore"),
        run_via_xenstore: true,
        ..BASE
    },
];

/// The cudarc test program (built by the lab; relative to the workspace root).
const CUDA_APP: &str = "target/release/examples/cudarc_app";

const DEFAULT_TIMEOUT_S: u64 = 240;
const XEN_BIN: &str = "/usr/lib/xen-4.17/bin";
/// Where the guest images lie inside dom0 (`build-image --boot-dir` + `/<scenario>`).
const GUEST_BOOT_DIR: &str = "/usr/share/vgpu-guest";
const GUEST_MEMORY_MIB: u32 = 256;
const XEN_HYPERVISOR_PKG: &str = "xen-hypervisor-4.17-amd64";
const XEN_MODULES: &[&str] = &["xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xenfs"];
const DOM0_INIT: &str = include_str!("../lab/dom0-init.sh");
const STANDIN_INIT: &str = include_str!("../lab/standin-init.sh");
/// Xen's command line. `smap=0` is required under TCG with `-cpu max`. `xsave=0`: with
/// XSAVE, vector registers of guest threads came back corrupted across context switches
/// under QEMU 7.2's TCG (16- or 128-byte holes, at the vector width, in data memcpy'd by
/// the cudarc program's threads; gone with FXSAVE, in a single-threaded TCG too). An
/// emulation fault: real hardware needs no such option. `gnttab_max_frames=128`: room for
/// the `bigwindow` guest's grant table (Xen's default allows 64 frames).
const XEN_ARGS: &str =
    "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2 smap=0 xsave=0 gnttab_max_frames=128";
/// `nokaslr`: dom0 once hung under TCG right after "Poking KASLR using RDRAND RDTSC".
const DOM0_ARGS: &str = "console=hvc0 earlyprintk=xen loglevel=4 nokaslr";
/// Lines of the console log shown when the lab fails.
const FAIL_TAIL_LINES: usize = 150;

/// Host files the lab needs, and the Debian package that has each.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/cpio", "cpio"),
    ("/usr/bin/gzip", "gzip"),
    ("/usr/bin/xz", "xz-utils"),
    ("/usr/bin/strip", "binutils"),
    ("/usr/bin/dpkg-deb", "dpkg"),
    ("/usr/bin/apt-get", "apt"),
    ("/usr/bin/ldd", "libc-bin"),
    ("/usr/lib/xen-4.17/bin/xl", "xen-utils-4.17"),
    ("/usr/lib/xen-4.17/bin/xenstored", "xen-utils-4.17"),
    ("/usr/lib/xen-4.17/bin/xenconsoled", "xen-utils-4.17"),
    ("/usr/lib/xen-4.17/bin/xen-init-dom0", "xen-utils-4.17"),
    ("/usr/lib/xen-4.17/bin/libxl-save-helper", "xen-utils-4.17"),
    ("/usr/bin/xenstore", "xenstore-utils"),
    ("/usr/bin/xenstore-read", "xenstore-utils"),
];
/// What `xenstore` (a multi-call binary) is also called in dom0.
const XENSTORE_NAMES: &[&str] = &[
    "xenstore-read",
    "xenstore-write",
    "xenstore-ls",
    "xenstore-watch",
    "xenstore-list",
    "xenstore-rm",
    "xenstore-exists",
];

/// `cargo xtask xen-lab`: boots Xen + dom0 in QEMU and runs the guest scenarios.
#[derive(clap::Parser)]
pub struct LabOptions {
    /// Leave a dom0 shell on the terminal after the scenarios (Ctrl-a x quits QEMU).
    #[arg(long)]
    shell: bool,
    /// Run the remaining scenarios after one fails.
    #[arg(long)]
    keep_going: bool,
    /// Stop QEMU after this many seconds (not with --shell).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_S)]
    timeout: u64,
    /// Run only this scenario (repeatable): hello, false.
    #[arg(long = "scenario", value_name = "NAME")]
    scenarios: Vec<String>,
    /// Boot a busybox stand-in on Debian's kernel instead of the project's guest image
    /// (debugging the lab itself).
    #[arg(long)]
    stand_in_guest: bool,
    /// Show the whole serial console on the terminal, not only the markers.
    #[arg(long, short)]
    verbose: bool,
}

struct Options {
    shell: bool,
    keep_going: bool,
    timeout: Duration,
    stand_in: bool,
    verbose: bool,
    scenarios: Vec<&'static Scenario>,
}

impl Options {
    fn new(a: &LabOptions) -> Result<Options> {
        let mut scenarios = Vec::new();
        for n in &a.scenarios {
            let s = SCENARIOS.iter().find(|s| s.name == n).with_context(|| {
                let names: Vec<_> = SCENARIOS.iter().map(|s| s.name).collect();
                format!("no scenario {n:?}; there are: {}", names.join(", "))
            })?;
            scenarios.push(s);
        }
        if scenarios.is_empty() {
            scenarios = SCENARIOS.iter().collect();
        }
        Ok(Options {
            shell: a.shell,
            keep_going: a.keep_going,
            timeout: Duration::from_secs(a.timeout),
            stand_in: a.stand_in_guest,
            verbose: a.verbose,
            scenarios,
        })
    }
}

/// `cargo xtask xen-lab ...`
pub fn main(args: &LabOptions) -> Result<()> {
    let opts = Options::new(args)?;
    let started = Instant::now();
    let lab = super::workspace_root().join("target/xen-lab");
    fs::create_dir_all(&lab).with_context(|| format!("creating {}", lab.display()))?;

    phase("host prerequisites", host_prerequisites)?;
    let cache = cache_dir()?;
    let assets = phase("lab assets (Xen, dom0 kernel)", || Assets::get(&cache))?;
    let host_proxy = phase("host-proxy", build_host_proxy)?;
    let guests = phase("guest images", || {
        if opts.stand_in {
            opts.scenarios.iter().map(|s| stand_in_guest(s, &assets, &cache, &lab)).collect()
        } else {
            opts.scenarios.iter().map(|s| build_guest(s, &lab)).collect::<Result<Vec<_>>>()
        }
    })?;
    let dom0_cpio = phase("dom0 initramfs", || build_dom0(&opts, &assets, &host_proxy, &guests, &lab))?;
    let log_path = lab.join("console.log");
    let mut run = phase("boot Xen in QEMU", || boot(&opts, &assets, &dom0_cpio, &log_path))?;
    if !opts.shell && run.phases.iter().all(|(p, _)| p != "dom0 /init") {
        // dom0 never reached its /init: an emulator hiccup, not a result. One retry.
        eprintln!("xen-lab: dom0 never started; booting once more");
        run = phase("boot Xen in QEMU (retry)", || boot(&opts, &assets, &dom0_cpio, &log_path))?;
    }
    let failures = verdict(&opts, &run);
    let total = started.elapsed().as_secs_f64();
    if failures.is_empty() {
        eprintln!(
            "xen-lab: PASS ({} scenario(s)) in {total:.1}s (QEMU {:.1}s); console log: {}",
            opts.scenarios.len(),
            run.qemu_seconds,
            log_path.display()
        );
        return Ok(());
    }
    if !opts.shell {
        print_tail(&log_path);
    }
    for f in &failures {
        eprintln!("xen-lab: FAIL: {f}");
    }
    bail!("xen-lab FAILED after {total:.1}s; console log: {}", log_path.display())
}

/// Runs one preparation phase, timing it (like `step`, for phases that return a value).
fn phase<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("==> xen-lab: {name}");
    let t = Instant::now();
    let r = f();
    eprintln!("<== xen-lab: {name}: {} in {:.1}s", if r.is_ok() { "ok" } else { "FAILED" }, t.elapsed().as_secs_f64());
    r.with_context(|| format!("xen-lab: {name}"))
}

// ---------------------------------------------------------------------------------------------
// Host prerequisites and cached assets

fn missing_host_packages() -> Vec<&'static str> {
    let mut missing = super::missing_packages(HOST_TOOLS);
    // A dynamically linked busybox (Debian's `busybox` package) would need its libraries.
    let busybox_static = fs::read("/bin/busybox")
        .ok()
        .and_then(|elf| super::image::check::elf_deps(&elf).ok().flatten())
        .is_some_and(|d| d.interp.is_none() && d.needed.is_empty());
    if Path::new("/bin/busybox").exists() && !busybox_static && !missing.contains(&"busybox-static") {
        missing.push("busybox-static");
    }
    missing
}

fn apt_get() -> Command {
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive");
    c
}

fn host_prerequisites() -> Result<()> {
    super::apt_install(&missing_host_packages())?;
    let still = missing_host_packages();
    if !still.is_empty() {
        bail!("still missing after apt-get install: {}", still.join(" "));
    }
    Ok(())
}

/// `$XEN_VGPU_CACHE/lab`, by default `~/.cache/xen-vgpu/lab` (build-image keeps its kernel
/// builds beside it).
fn cache_dir() -> Result<PathBuf> {
    let dir = super::image::cache_dir()?.join("lab");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// The Xen hypervisor and the dom0 kernel, from Debian packages.
struct Assets {
    /// The gunzipped hypervisor (QEMU's multiboot loader does not take the .gz).
    xen: PathBuf,
    /// The dom0 kernel, uncompressed (Xen's dom0 builder would otherwise spend seconds
    /// un-xz-ing it under emulation).
    vmlinux: PathBuf,
    /// The kernel's Xen modules (`<name>.ko`).
    modules: PathBuf,
    /// The kernel release (`uname -r`).
    release: String,
}

impl Assets {
    fn get(cache: &Path) -> Result<Assets> {
        let stamp = cache.join("assets.done");
        let assets = |release: String| Assets {
            xen: cache.join("xen"),
            vmlinux: cache.join("vmlinux"),
            modules: cache.join("modules"),
            release,
        };
        if let Ok(release) = fs::read_to_string(&stamp) {
            let a = assets(release.trim().to_string());
            if a.xen.exists() && a.vmlinux.exists() && a.modules.is_dir() {
                eprintln!("cached in {} (kernel {}); delete it to refetch", cache.display(), a.release);
                return Ok(a);
            }
        }
        let kernel_pkg = kernel_package()?;
        eprintln!("downloading {XEN_HYPERVISOR_PKG} and {kernel_pkg} into {}", cache.display());
        let debs = cache.join("debs");
        let unpacked = cache.join("unpacked");
        for d in [&debs, &unpacked] {
            let _ = fs::remove_dir_all(d);
            fs::create_dir_all(d)?;
        }
        super::run(apt_get().current_dir(&debs).args(["download", XEN_HYPERVISOR_PKG, &kernel_pkg]))?;
        for entry in fs::read_dir(&debs)? {
            let deb = entry?.path();
            super::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
        }

        let xen_gz = unpacked.join("boot/xen-4.17-amd64.gz");
        let out = fs::File::create(cache.join("xen"))?;
        super::run(Command::new("gzip").arg("-dc").arg(&xen_gz).stdout(out))?;

        let mods = unpacked.join("lib/modules");
        let release = fs::read_dir(&mods)
            .with_context(|| format!("{} has no lib/modules", kernel_pkg))?
            .next()
            .context("no kernel release in the kernel package")??
            .file_name()
            .to_string_lossy()
            .into_owned();
        decompress_bzimage(&unpacked.join(format!("boot/vmlinuz-{release}")), &cache.join("vmlinux"))?;

        let modules = cache.join("modules");
        let _ = fs::remove_dir_all(&modules);
        fs::create_dir_all(&modules)?;
        let xen_drivers = mods.join(&release).join("kernel/drivers/xen");
        for m in XEN_MODULES {
            let file = find_module(&xen_drivers, m).with_context(|| format!("no module {m} in {kernel_pkg}"))?;
            let dest = modules.join(format!("{m}.ko"));
            if file.extension().is_some_and(|e| e == "xz") {
                super::run(Command::new("xz").arg("-dc").arg(&file).stdout(fs::File::create(&dest)?))?;
            } else {
                fs::copy(&file, &dest)?;
            }
        }
        // Only the pieces above are kept: the unpacked kernel package is ~400 MB.
        fs::remove_dir_all(&unpacked)?;
        fs::remove_dir_all(&debs)?;
        let _ = fs::remove_file(cache.join("standin-vmlinuz.gz"));
        fs::write(&stamp, format!("{release}\n"))?;
        Ok(assets(release))
    }
}

/// The current kernel package behind Debian's `linux-image-amd64` metapackage.
fn kernel_package() -> Result<String> {
    let query = || -> Option<String> {
        let out = Command::new("apt-cache").args(["depends", "linux-image-amd64"]).output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find(|w| w.starts_with("linux-image-") && w.ends_with("-amd64") && w != &"linux-image-amd64")
            .map(str::to_string)
    };
    if let Some(p) = query() {
        return Ok(p);
    }
    super::run(apt_get().arg("update"))?;
    query().context("apt-cache cannot resolve linux-image-amd64 (is Debian's main archive in the apt sources?)")
}

fn find_module(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(found) = find_module(&p, name) {
                return Some(found);
            }
        } else if let Some(f) = p.file_name().and_then(|f| f.to_str()) {
            if f == format!("{name}.ko") || f == format!("{name}.ko.xz") {
                return Some(p);
            }
        }
    }
    None
}

/// Extracts the xz-compressed kernel ELF from a bzImage.
fn decompress_bzimage(bzimage: &Path, out: &Path) -> Result<()> {
    let data = fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
    let at = data
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .with_context(|| format!("{} holds no xz-compressed kernel", bzimage.display()))?;
    let mut xz = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(fs::File::create(out)?)
        .spawn()
        .context("starting xz")?;
    // xz stops reading after the first stream; what follows it in the bzImage is not xz data.
    let _ = xz.stdin.take().context("xz stdin")?.write_all(&data[at..]);
    let status = xz.wait()?;
    if !status.success() {
        bail!("xz could not decompress the kernel in {} ({status})", bzimage.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// host-proxy and the guest images

struct HostProxy {
    binary: PathBuf,
    /// The listening socket of its embedded default configuration.
    socket: String,
}

fn build_host_proxy() -> Result<HostProxy> {
    super::run(super::cargo().args(["build", "--release", "-p", "host-proxy", "--bin", "host-proxy"]))?;
    // The CUDA scenarios' program and libvgpu (also run in dom0 over the local transport).
    super::run(super::cargo().args(["build", "--release", "-p", "libvgpu", "--lib", "--example", "cudarc_app"]))?;
    let binary = super::workspace_root().join("target/release/host-proxy");
    let out = Command::new(&binary).arg("default-config").output().context("host-proxy default-config")?;
    let config = String::from_utf8_lossy(&out.stdout);
    let socket = config
        .lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "socket")
        .map(|(_, v)| v.split('#').next().unwrap_or("").trim().trim_matches('"').to_string())
        .context("host-proxy's default configuration names no socket")?;
    Ok(HostProxy { binary, socket })
}

/// A guest image ready for dom0: `dir` holds `vmlinuz`, `initramfs.cpio.gz` and `<domain>.cfg`,
/// which go to `boot_dir` inside dom0.
struct Guest {
    scenario: &'static Scenario,
    domain: String,
    dir: PathBuf,
    boot_dir: String,
}

impl Guest {
    fn new(scenario: &'static Scenario, lab: &Path) -> Guest {
        Guest {
            scenario,
            domain: format!("vgpu-lab-{}", scenario.name),
            dir: lab.join("guest").join(scenario.name),
            boot_dir: format!("{GUEST_BOOT_DIR}/{}", scenario.name),
        }
    }
    fn config(&self) -> String {
        format!("{}/{}.cfg", self.boot_dir, self.domain)
    }
}

/// The project's guest image, from `cargo xtask build-image`.
fn build_guest(scenario: &'static Scenario, lab: &Path) -> Result<Guest> {
    let g = Guest::new(scenario, lab);
    let _ = fs::remove_dir_all(&g.dir);
    let mut cmd = Command::new(std::env::current_exe().context("finding the xtask binary")?);
    cmd.arg("build-image").arg("--out").arg(&g.dir).args(["--boot-dir", &g.boot_dir, "--name", &g.domain]);
    cmd.args(["--memory", &GUEST_MEMORY_MIB.to_string(), "--window-mib", &scenario.window_mib.to_string()]);
    for app in scenario.apps {
        cmd.args(["--app", app]);
    }
    if !scenario.run_via_xenstore {
        cmd.args(["--run", scenario.run]);
    }
    if !scenario.extra.is_empty() {
        cmd.args(["--extra-cmdline", scenario.extra]);
    }
    super::run(&mut cmd).context(
        "`cargo xtask build-image` failed (to test the lab itself without the project's guest image, \
         run `cargo xtask xen-lab --stand-in-guest`)",
    )?;
    let cfg_name = format!("{}.cfg", g.domain);
    for f in ["vmlinuz", "initramfs.cpio.gz", &cfg_name] {
        if !g.dir.join(f).is_file() {
            bail!("build-image did not produce {}", g.dir.join(f).display());
        }
    }
    let cfg = fs::read_to_string(g.dir.join(&cfg_name))?;
    if !cfg.contains(&format!("{}/vmlinuz", g.boot_dir)) || !cfg.contains(&format!("{}/initramfs.cpio.gz", g.boot_dir))
    {
        eprintln!("warning: {cfg_name} does not point at {}/vmlinuz and initramfs.cpio.gz:\n{cfg}", g.boot_dir);
    }
    Ok(g)
}

/// A guest that follows the agent's contract with Debian's kernel and busybox (see
/// `xtask/lab/standin-init.sh`); for debugging the lab, not the project's image.
fn stand_in_guest(scenario: &'static Scenario, assets: &Assets, cache: &Path, lab: &Path) -> Result<Guest> {
    let g = Guest::new(scenario, lab);
    let _ = fs::remove_dir_all(&g.dir);
    fs::create_dir_all(&g.dir)?;
    // libxenguest gunzips a kernel much faster than it un-xz-es the bzImage under emulation.
    let kernel = cache.join("standin-vmlinuz.gz");
    if !kernel.exists() {
        let tmp = cache.join("standin-vmlinuz.gz.tmp");
        super::run(Command::new("gzip").arg("-1c").arg(&assets.vmlinux).stdout(fs::File::create(&tmp)?))?;
        fs::rename(&tmp, &kernel)?;
    }
    fs::copy(&kernel, g.dir.join("vmlinuz"))?;

    let root = g.dir.join("root");
    let r = Staging::new(&root)?;
    r.busybox()?;
    for m in XEN_MODULES {
        r.copy(&assets.modules.join(format!("{m}.ko")), &format!("/lib/modules/{}/{m}.ko", assets.release))?;
    }
    r.copy_with_libs(Path::new("/usr/bin/xenstore"), "/usr/bin/xenstore")?;
    r.link("xenstore", "/usr/bin/xenstore-write")?;
    for app in scenario.apps {
        let name = Path::new(app).file_name().context("app without a file name")?.to_string_lossy().into_owned();
        r.copy_with_libs(Path::new(app), &format!("/usr/bin/{name}"))?;
    }
    r.write("/etc/vgpu-run", scenario.run, 0o644)?;
    r.write("/init", STANDIN_INIT, 0o755)?;
    r.cpio_gz(&g.dir.join("initramfs.cpio.gz"))?;
    fs::remove_dir_all(&root)?;

    let cfg = format!(
        "name = \"{dom}\"\ntype = \"pv\"\nkernel = \"{b}/vmlinuz\"\nramdisk = \"{b}/initramfs.cpio.gz\"\n\
         extra = \"console=hvc0 quiet\"\nmemory = {GUEST_MEMORY_MIB}\nvcpus = 1\non_poweroff = \"destroy\"\n",
        dom = g.domain,
        b = g.boot_dir
    );
    fs::write(g.dir.join(format!("{}.cfg", g.domain)), cfg)?;
    Ok(g)
}

// ---------------------------------------------------------------------------------------------
// Initramfs staging

/// A directory tree that becomes an initramfs.
struct Staging {
    root: PathBuf,
}

impl Staging {
    fn new(root: &Path) -> Result<Staging> {
        let _ = fs::remove_dir_all(root);
        for d in ["bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root", "usr/bin", "lib64"] {
            fs::create_dir_all(root.join(d)).with_context(|| format!("creating {}", root.join(d).display()))?;
        }
        fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
        Ok(Staging { root: root.to_path_buf() })
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    fn mkdir(&self, inside: &str) -> Result<()> {
        fs::create_dir_all(self.path(inside)).with_context(|| format!("creating {}", self.path(inside).display()))
    }

    fn copy(&self, from: &Path, inside: &str) -> Result<()> {
        let to = self.path(inside);
        fs::create_dir_all(to.parent().expect("absolute path"))?;
        fs::copy(from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        Ok(())
    }

    /// Copies an executable and the shared libraries `ldd` names for it (to the same paths).
    fn copy_with_libs(&self, from: &Path, inside: &str) -> Result<()> {
        self.copy(from, inside)?;
        self.libs_of(from)
    }

    fn libs_of(&self, exe: &Path) -> Result<()> {
        for lib in super::image::shared_libs(exe)? {
            let inside = lib.to_str().context("library path is not UTF-8")?;
            if !self.path(inside).exists() {
                self.copy(&lib, inside)?;
            }
        }
        Ok(())
    }

    fn link(&self, target: &str, inside: &str) -> Result<()> {
        let at = self.path(inside);
        fs::create_dir_all(at.parent().expect("absolute path"))?;
        let _ = fs::remove_file(&at);
        symlink(target, &at).with_context(|| format!("linking {}", at.display()))
    }

    fn write(&self, inside: &str, text: &str, mode: u32) -> Result<()> {
        let to = self.path(inside);
        fs::create_dir_all(to.parent().expect("absolute path"))?;
        fs::write(&to, text)?;
        fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// Static busybox as /bin/busybox, with a link for each applet.
    fn busybox(&self) -> Result<()> {
        self.copy(Path::new("/bin/busybox"), "/bin/busybox")?;
        let out = Command::new("/bin/busybox").arg("--list").output().context("busybox --list")?;
        for applet in String::from_utf8_lossy(&out.stdout).lines().filter(|a| !a.is_empty() && *a != "busybox") {
            let at = format!("/bin/{applet}");
            if !self.path(&at).exists() {
                self.link("busybox", &at)?;
            }
        }
        Ok(())
    }

    /// Writes the tree as a gzip-compressed (level 1) newc cpio archive.
    fn cpio_gz(&self, out: &Path) -> Result<()> {
        let mut find = Command::new("find")
            .args([".", "-print0"])
            .current_dir(&self.root)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting find")?;
        let mut cpio = Command::new("cpio")
            .args(["-o", "-H", "newc", "-0", "--quiet", "-R", "0:0"])
            .current_dir(&self.root)
            .stdin(find.stdout.take().context("find stdout")?)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting cpio")?;
        let gzip = Command::new("gzip")
            .arg("-1")
            .stdin(cpio.stdout.take().context("cpio stdout")?)
            .stdout(fs::File::create(out).with_context(|| format!("creating {}", out.display()))?)
            .status()
            .context("running gzip")?;
        let (f, c) = (find.wait()?, cpio.wait()?);
        if !(f.success() && c.success() && gzip.success()) {
            bail!("building {} failed (find {f}, cpio {c}, gzip {gzip})", out.display());
        }
        Ok(())
    }
}

/// Files with the same contents as an earlier one in `seen` become hard links to it (the
/// guest kernels of several scenarios are usually the same file).
fn copy_dedup(from: &Path, to: &Path, seen: &mut Vec<PathBuf>) -> Result<()> {
    let data = fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    for earlier in seen.iter() {
        if fs::metadata(earlier)?.len() == data.len() as u64 && fs::read(earlier)? == data {
            fs::hard_link(earlier, to)?;
            return Ok(());
        }
    }
    fs::write(to, &data)?;
    seen.push(to.to_path_buf());
    Ok(())
}

fn build_dom0(
    opts: &Options,
    assets: &Assets,
    host_proxy: &HostProxy,
    guests: &[Guest],
    lab: &Path,
) -> Result<PathBuf> {
    let r = Staging::new(&lab.join("dom0-root"))?;
    r.busybox()?;
    for d in [
        "/etc/xen",
        "/var/lib/xen",
        "/var/lib/xenstored",
        "/var/log/xen/console",
        "/var/lock",
        "/run/xen",
        "/run/xenstored",
    ] {
        r.mkdir(d)?;
    }
    r.link("../run", "/var/run")?;
    for m in XEN_MODULES {
        r.copy(&assets.modules.join(format!("{m}.ko")), &format!("/lib/modules/{}/{m}.ko", assets.release))?;
    }
    for exe in ["xl", "xenstored", "xenconsoled", "xen-init-dom0", "libxl-save-helper"] {
        let p = format!("{XEN_BIN}/{exe}");
        r.copy_with_libs(Path::new(&p), &p)?;
    }
    r.copy_with_libs(Path::new("/usr/bin/xenstore"), "/usr/bin/xenstore")?;
    for name in XENSTORE_NAMES {
        r.link("xenstore", &format!("/usr/bin/{name}"))?;
    }
    r.write("/etc/xen/xl.conf", "autoballoon = \"off\"\n", 0o644)?;

    // host-proxy, without its debug info (it would double the initramfs).
    let hp = r.path("/usr/bin/host-proxy");
    super::run(Command::new("strip").arg("-o").arg(&hp).arg(&host_proxy.binary))?;
    r.libs_of(&host_proxy.binary)?;
    // The CUDA program and libvgpu, for the local-transport benchmark next to the Xen one.
    let root = super::workspace_root();
    super::run(Command::new("strip").arg("-o").arg(r.path("/usr/bin/cudarc_app")).arg(root.join(CUDA_APP)))?;
    r.libs_of(&root.join(CUDA_APP))?;
    r.mkdir("/usr/lib/vgpu")?;
    super::run(
        Command::new("strip")
            .arg("-o")
            .arg(r.path("/usr/lib/vgpu/libcuda.so.1"))
            .arg(root.join("target/release/libcuda.so")),
    )?;

    let mut seen = Vec::new();
    let mut scenarios = String::new();
    for g in guests {
        r.mkdir(&g.boot_dir)?;
        for entry in fs::read_dir(&g.dir)? {
            let p = entry?.path();
            if p.is_file() {
                copy_dedup(&p, &r.path(&g.boot_dir).join(p.file_name().expect("file")), &mut seen)?;
            }
        }
        let s = g.scenario;
        scenarios.push_str(&format!(
            "{} {} {} {} {} {} {} {}\n",
            s.name,
            g.domain,
            g.config(),
            s.timeout_s,
            s.expect_status,
            s.destroy_on.unwrap_or("-"),
            s.shutdown_on.unwrap_or("-"),
            s.restart_on.unwrap_or("-")
        ));
    }
    r.write("/etc/vgpu-lab/scenarios", &scenarios, 0o644)?;
    for g in guests.iter().filter(|g| g.scenario.run_via_xenstore) {
        r.write(&format!("/etc/vgpu-lab/{}.xenstore-run", g.scenario.name), g.scenario.run, 0o644)?;
    }
    let conf = format!(
        "VGPU_LAB_SHELL={}\nVGPU_LAB_KEEP_GOING={}\nHOST_PROXY_SOCKET={}\n",
        u8::from(opts.shell),
        u8::from(opts.keep_going),
        host_proxy.socket
    );
    r.write("/etc/vgpu-lab/lab.conf", &conf, 0o644)?;
    r.write("/init", DOM0_INIT, 0o755)?;
    let out = lab.join("dom0.cpio.gz");
    r.cpio_gz(&out)?;
    eprintln!("{} ({:.1} MiB)", out.display(), fs::metadata(&out)?.len() as f64 / (1 << 20) as f64);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Booting and watching the serial console

enum Event {
    Line(f64, String),
    Closed,
}

/// What the serial console showed.
#[derive(Default)]
struct Run {
    qemu_seconds: f64,
    timed_out: bool,
    qemu_status: String,
    /// First time (s) each phase marker was seen.
    phases: Vec<(String, f64)>,
    host_proxy_start: Option<String>,
    host_proxy_end: Option<String>,
    setup_failed: Option<String>,
    done: bool,
    scenarios: BTreeMap<String, ScenarioRun>,
    /// Zones host-proxy started and ended over the whole run (from its log).
    zones: Option<(u32, u32)>,
    /// dom0's one scrape of host-proxy's metrics after the scenarios.
    metrics: Option<Scrape>,
}

/// The figures the lab checks from its scrape of host-proxy's Prometheus endpoint.
#[derive(Debug, Default)]
struct Scrape {
    ok: bool,
    sessions_started: u64,
    sessions_ended: u64,
    xen_slots_claimed: u64,
}

#[derive(Default)]
struct ScenarioRun {
    /// "ok" or why not, for a scenario whose domain dom0 destroyed.
    cleanup: Option<String>,
    /// For a scenario that restarts host-proxy: the new daemon's state ("alive" or why not)
    /// and how many workers ran just before it was killed (at least the guest's, or the
    /// count is blind) and how many of them were left after.
    restarted: Option<String>,
    workers_before: Option<String>,
    old_workers: Option<String>,
    ended: bool,
    /// "shutdown", "crashed", "vanished", "timeout"; None if not reached.
    domain: Option<String>,
    state: Option<String>,
    exit_status: Option<String>,
    error: Option<String>,
    console: Vec<String>,
    xl_create_failed: bool,
    begin: f64,
    end: f64,
}

/// Serial lines worth showing on the terminal (without --verbose), besides markers and the
/// guests' consoles.
const NOTABLE: &[(&str, &str)] = &[
    ("(XEN) Xen version", "Xen started"),
    ("*** Serial input to DOM0", "dom0 kernel starting"),
    ("Kernel panic", ""),
    ("(XEN) Panic", ""),
    ("(XEN) ****", ""),
    ("BUG:", ""),
    ("Oops", ""),
    ("Run /init as init process", "dom0 init"),
];

impl Run {
    fn phase(&mut self, name: &str, t: f64) {
        if !self.phases.iter().any(|(n, _)| n == name) {
            self.phases.push((name.to_string(), t));
        }
    }

    /// Updates from one serial line; returns whether it is worth showing on the terminal.
    fn observe(&mut self, t: f64, line: &str) -> bool {
        if let Some(guest) = line.strip_prefix("[domU] ") {
            if let Some(s) = self.scenarios.values_mut().find(|s| !s.ended) {
                s.console.push(guest.to_string());
            }
            return true;
        }
        // What dom0 shows of host-proxy as an operator would see it (status, one scrape).
        if line.starts_with("[status] ") || line.starts_with("[metrics] ") {
            return true;
        }
        if line.contains("VGPU-LAB-DONE") {
            self.done = true;
            self.phase("VGPU-LAB-DONE", t);
            return true;
        }
        let Some(at) = line.find("VGPU-LAB ") else {
            for (pattern, phase) in NOTABLE {
                if line.contains(pattern) {
                    if !phase.is_empty() {
                        self.phase(phase, t);
                    }
                    return true;
                }
            }
            return false;
        };
        let marker = &line[at + "VGPU-LAB ".len()..];
        let fields: BTreeMap<&str, &str> = marker.split_whitespace().filter_map(|w| w.split_once('=')).collect();
        let event = marker.split_whitespace().next().unwrap_or("");
        if event == "dom0-init" {
            self.phase("dom0 /init", t);
        } else if event == "xen-ready" {
            self.phase("Xen toolstack ready", t);
        } else if event.starts_with("setup-failed") {
            self.setup_failed = Some(fields.get("what").unwrap_or(&"?").to_string());
        } else if let Some(v) = fields.get("host-proxy") {
            self.host_proxy_start = Some(v.to_string());
        } else if let Some(v) = fields.get("host-proxy-end") {
            self.host_proxy_end = Some(v.to_string());
        } else if let Some(name) = fields.get("scenario") {
            let s = self.scenarios.entry(name.to_string()).or_default();
            let word = marker.split_whitespace().nth(1).unwrap_or("");
            if word == "begin" {
                s.begin = t;
            } else if word == "end" {
                s.ended = true;
                s.end = t;
            } else if word == "xl-create-failed" {
                s.xl_create_failed = true;
            } else if let Some((_, err)) = marker.split_once("guest-error: ") {
                s.error = Some(err.trim().to_string());
            } else if let Some(how) = word.strip_prefix("domain-") {
                s.domain = Some(how.to_string());
            }
            if let Some(v) = fields.get("guest-state") {
                s.state = Some(v.to_string());
            }
            if let Some(v) = fields.get("guest-exit-status") {
                s.exit_status = Some(v.to_string());
            }
            if let Some(v) = fields.get("host-cleanup") {
                s.cleanup = Some(v.to_string());
            }
            if let Some(v) = fields.get("host-proxy-restarted") {
                s.restarted = Some(v.to_string());
            }
            if let Some(v) = fields.get("workers-before-kill") {
                s.workers_before = Some(v.to_string());
            }
            if let Some(v) = fields.get("old-workers") {
                s.old_workers = Some(v.to_string());
            }
        } else if event == "metrics" {
            let n = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
            self.metrics = Some(Scrape {
                ok: fields.get("scraped") == Some(&"ok"),
                sessions_started: n("sessions-started"),
                sessions_ended: n("sessions-ended"),
                xen_slots_claimed: n("xen-slots-claimed"),
            });
        } else if event == "zones" {
            let n = |k: &str| fields.get(k).and_then(|v| v.parse().ok());
            self.zones = Some((n("started").unwrap_or(0), n("ended").unwrap_or(0)));
        }
        true
    }
}

fn boot(opts: &Options, assets: &Assets, dom0_cpio: &Path, log_path: &Path) -> Result<Run> {
    for p in [&assets.xen, &assets.vmlinux, &dom0_cpio.to_path_buf()] {
        if p.to_string_lossy().contains([',', ' ']) {
            bail!("{}: QEMU's -initrd cannot take paths with commas or spaces", p.display());
        }
    }
    let initrd = format!("{} {},{}", assets.vmlinux.display(), DOM0_ARGS.replace(',', ",,"), dom0_cpio.display());
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-m", "2048", "-smp", "2", "-display", "none"]);
    cmd.args(["-no-reboot", "-net", "none", "-kernel"])
        .arg(&assets.xen)
        .args(["-append", XEN_ARGS, "-initrd", &initrd]);
    if opts.shell {
        // Ctrl-a x quits, Ctrl-a c switches to the QEMU monitor.
        cmd.args(["-serial", "mon:stdio"]).stdin(Stdio::inherit());
    } else {
        cmd.args(["-serial", "stdio", "-monitor", "none"]).stdin(Stdio::null());
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut log = fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    writeln!(log, "# {cmd:?}")?;
    if opts.shell {
        eprintln!("xen-lab: the dom0 shell follows the scenarios; Ctrl-a x quits QEMU");
    } else {
        eprintln!("xen-lab: timeout {}s; full serial console in {}", opts.timeout.as_secs(), log_path.display());
    }
    let t0 = Instant::now();
    let mut qemu = cmd.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    let out = qemu.stdout.take().context("qemu stdout")?;
    let err = qemu.stderr.take().context("qemu stderr")?;
    let passthrough = opts.shell;
    let readers =
        [spawn_reader(out, "", t0, tx.clone(), passthrough), spawn_reader(err, "[qemu stderr] ", t0, tx, false)];

    let mut run = Run::default();
    let mut open = readers.len();
    let mut done_at: Option<Instant> = None;
    let mut killed = false;
    while open > 0 {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Event::Line(t, line)) => {
                writeln!(log, "[{t:7.2}] {line}")?;
                let notable = run.observe(t, &line);
                if !passthrough && (notable || opts.verbose) {
                    eprintln!("[{t:6.1}s] {line}");
                }
                if run.done && done_at.is_none() {
                    done_at = Some(Instant::now());
                }
            }
            Ok(Event::Closed) => open -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if killed {
            continue;
        }
        if !opts.shell && t0.elapsed() > opts.timeout {
            run.timed_out = true;
            eprintln!("xen-lab: timeout after {}s, stopping QEMU", opts.timeout.as_secs());
            let _ = qemu.kill();
            killed = true;
        } else if !opts.shell && done_at.is_some_and(|d| d.elapsed() > Duration::from_secs(10)) {
            // dom0 rebooted Xen, and -no-reboot should have ended QEMU by now.
            let _ = qemu.kill();
            killed = true;
        }
    }
    let status = qemu.wait()?;
    run.qemu_seconds = t0.elapsed().as_secs_f64();
    run.qemu_status = status.to_string();
    writeln!(log, "# QEMU ended after {:.2}s: {status}", run.qemu_seconds)?;
    eprintln!("xen-lab: QEMU ended after {:.1}s ({status})", run.qemu_seconds);
    let mut timeline: Vec<(f64, String)> = run.phases.iter().map(|(n, t)| (*t, n.clone())).collect();
    for (name, s) in &run.scenarios {
        timeline.push((s.begin, format!("scenario {name} begins")));
        if s.ended {
            timeline.push((s.end, format!("scenario {name} ends ({:.1}s)", s.end - s.begin)));
        }
    }
    timeline.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (t, what) in &timeline {
        eprintln!("  {t:6.1}s  {what}");
    }
    Ok(run)
}

/// Reads a QEMU output stream into timestamped lines (echoing it raw when `passthrough`).
fn spawn_reader(
    mut stream: impl Read + Send + 'static,
    prefix: &'static str,
    t0: Instant,
    tx: mpsc::Sender<Event>,
    passthrough: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut line = Vec::new();
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if passthrough {
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(&buf[..n]);
                let _ = o.flush();
            }
            let t = t0.elapsed().as_secs_f64();
            for &b in &buf[..n] {
                if b == b'\n' {
                    let text =
                        String::from_utf8_lossy(&line).trim_end_matches('\r').trim_start_matches('\r').to_string();
                    let _ = tx.send(Event::Line(t, format!("{prefix}{text}")));
                    line.clear();
                } else {
                    line.push(b);
                }
            }
        }
        if !line.is_empty() {
            let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
            let _ = tx.send(Event::Line(t0.elapsed().as_secs_f64(), format!("{prefix}{text}")));
        }
        let _ = tx.send(Event::Closed);
    })
}

/// Why the run failed; empty when it passed.
fn verdict(opts: &Options, run: &Run) -> Vec<String> {
    let mut failures = Vec::new();
    if run.timed_out {
        failures.push(format!("timed out after {}s", opts.timeout.as_secs()));
    }
    if let Some(what) = &run.setup_failed {
        failures.push(format!("dom0 setup failed: {what}"));
    }
    match run.host_proxy_start.as_deref() {
        Some("alive") => {}
        Some(s) => failures.push(format!("host-proxy did not come up in dom0 ({s})")),
        None => failures.push("host-proxy was never started in dom0".into()),
    }
    if let Some(end) = run.host_proxy_end.as_deref().filter(|e| *e != "alive") {
        failures.push(format!("host-proxy did not survive the scenarios ({end})"));
    }
    if let Some((started, ended)) = run.zones {
        if started != ended {
            failures.push(format!("host-proxy started {started} zones but ended {ended}: a zone outlived its guest"));
        }
    }
    for s in &opts.scenarios {
        let Some(r) = run.scenarios.get(s.name) else {
            failures.push(format!("scenario {}: never started", s.name));
            continue;
        };
        let mut why = Vec::new();
        if !r.ended {
            failures.push(format!("scenario {}: did not finish", s.name));
            continue;
        }
        if r.xl_create_failed {
            why.push("xl create failed".to_string());
        }
        if let Some(err) = &r.error {
            why.push(format!("the guest agent reported an error: {err}"));
        }
        if s.destroy_on.is_some() {
            match (r.domain.as_deref(), r.cleanup.as_deref()) {
                (Some("destroyed"), Some("ok")) => {}
                (Some("destroyed"), c) => {
                    why.push(format!("host-proxy did not end the zone of the destroyed guest ({})", c.unwrap_or("?")))
                }
                (d, _) => why.push(format!(
                    "the guest never showed {:?} to be destroyed (domain {})",
                    s.destroy_on.unwrap_or(""),
                    d.unwrap_or("?")
                )),
            }
            if why.is_empty() {
                eprintln!(
                    "xen-lab: scenario {}: PASS (guest destroyed mid-session, host-proxy ended its zone; {:.1}s)",
                    s.name,
                    r.end - r.begin
                );
            } else {
                failures.push(format!("scenario {}: {}", s.name, why.join("; ")));
            }
            continue;
        }
        if s.restart_on.is_some() {
            let counted = r.workers_before.as_deref().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
            if counted == 0 && r.restarted.is_some() {
                why.push(format!(
                    "dom0 counted {} workers before the kill (the guest's at least)",
                    r.workers_before.as_deref().unwrap_or("no")
                ));
            }
            match (r.restarted.as_deref(), r.old_workers.as_deref()) {
                (Some("alive"), Some("0")) => {}
                (None, _) => why.push(format!(
                    "the guest never showed {:?}, so host-proxy was not restarted",
                    s.restart_on.unwrap_or("")
                )),
                (Some(state), workers) => why.push(format!(
                    "host-proxy restarted: {state}, workers of the old daemon left: {}",
                    workers.unwrap_or("?")
                )),
            }
        }
        match r.domain.as_deref() {
            Some("shutdown") => {}
            Some("timeout") => why.push(format!("the domain did not shut down within {}s", s.timeout_s)),
            Some(other) => why.push(format!("the domain {other}")),
            None if !r.xl_create_failed => why.push("the domain's end was never reported".into()),
            None => {}
        }
        let status = s.expect_status.to_string();
        if r.exit_status.as_deref() != Some(status.as_str()) || r.state.as_deref() != Some("exited") {
            why.push(format!(
                "guest state {} exit status {} (expected exited, {status})",
                r.state.as_deref().unwrap_or("?"),
                r.exit_status.as_deref().unwrap_or("?")
            ));
        }
        if let Some(expect) = s.expect_line {
            if !r.console.iter().any(|l| l.trim() == expect) {
                let near = r.console.iter().find(|l| l.contains(expect));
                why.push(match near {
                    Some(l) => format!("{expect:?} only appeared inside the guest console line {l:?}"),
                    None => format!("the guest console never showed {expect:?}"),
                });
            }
        }
        if why.is_empty() {
            eprintln!(
                "xen-lab: scenario {}: PASS (exit status {status}{}; {:.1}s)",
                s.name,
                s.expect_line.map(|l| format!(", printed {l:?}")).unwrap_or_default(),
                r.end - r.begin
            );
        } else {
            failures.push(format!("scenario {}: {}", s.name, why.join("; ")));
        }
    }
    if !run.done && !opts.shell {
        failures.push("dom0 never printed VGPU-LAB-DONE".into());
    } else if run.done {
        failures.extend(metrics_verdict(opts, run.metrics.as_ref()));
    }
    failures
}

/// What the metrics scrape must show after a finished run: every session ended, and at
/// least one Xen slot claimed per CUDA scenario (each runs its program over the Xen ring).
fn metrics_verdict(opts: &Options, scrape: Option<&Scrape>) -> Option<String> {
    let s = match scrape {
        None => return Some("dom0 never scraped host-proxy's metrics".into()),
        Some(s) if !s.ok => return Some("host-proxy's metrics endpoint did not answer in dom0".into()),
        Some(s) => s,
    };
    // The daemon that is scraped counts only what came after the last restart.
    let after_restart = opts.scenarios.iter().rposition(|s| s.restart_on.is_some()).map_or(0, |i| i + 1);
    let cuda = opts.scenarios[after_restart..].iter().filter(|s| s.apps.contains(&CUDA_APP)).count() as u64;
    if s.sessions_started != s.sessions_ended {
        Some(format!(
            "the metrics show {} sessions started but {} ended: a session outlived its guest",
            s.sessions_started, s.sessions_ended
        ))
    } else if s.xen_slots_claimed < cuda {
        Some(format!("the metrics show {} Xen slots claimed for {cuda} CUDA scenarios", s.xen_slots_claimed))
    } else {
        eprintln!(
            "xen-lab: metrics: PASS ({} sessions started and ended, {} Xen slots claimed)",
            s.sessions_started, s.xen_slots_claimed
        );
        None
    }
}

fn print_tail(log_path: &Path) {
    let Ok(text) = fs::read_to_string(log_path) else { return };
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(FAIL_TAIL_LINES);
    eprintln!("---- last {} lines of {} ----", lines.len() - from, log_path.display());
    for l in &lines[from..] {
        eprintln!("{l}");
    }
    eprintln!("---- end of {} ----", log_path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(lines: &[&str]) -> Run {
        let mut run = Run::default();
        for (i, l) in lines.iter().enumerate() {
            run.observe(i as f64, l);
        }
        run
    }

    fn options() -> Options {
        Options {
            shell: false,
            keep_going: false,
            timeout: Duration::from_secs(1),
            stand_in: false,
            verbose: false,
            scenarios: SCENARIOS.iter().filter(|s| s.name == "hello" || s.name == "false").collect(),
        }
    }

    const GOOD: &[&str] = &[
        "VGPU-LAB dom0-init kernel=6.1.0 hypervisor=xen uptime=7.0",
        "VGPU-LAB xen-ready uptime=8.0",
        "VGPU-LAB host-proxy=alive pid=119 socket=/tmp/s uptime=8.1",
        "VGPU-LAB scenario=hello begin domain=vgpu-lab-hello config=/x.cfg uptime=8.2",
        "VGPU-LAB scenario=hello created domid=1 after=2.1 uptime=10.3",
        "[domU] vgpu-agent: starting /usr/bin/echo vgpu-lab-hello",
        "[domU] vgpu-lab-hello",
        "VGPU-LAB scenario=hello domain-shutdown after=4.0 uptime=12.0",
        "VGPU-LAB scenario=hello guest-state=exited guest-exit-status=0 expected-exit-status=0 uptime=12.1",
        "VGPU-LAB scenario=hello end uptime=12.5",
        "VGPU-LAB scenario=false begin domain=vgpu-lab-false config=/y.cfg uptime=12.6",
        "VGPU-LAB scenario=false created domid=2 after=2.1 uptime=14.7",
        "[domU] VGPU-LAB scenario=hello guest-exit-status=7",
        "VGPU-LAB scenario=false domain-shutdown after=4.0 uptime=16.0",
        "VGPU-LAB scenario=false guest-state=exited guest-exit-status=1 expected-exit-status=1 uptime=16.1",
        "VGPU-LAB scenario=false end uptime=16.5",
        "VGPU-LAB metrics scraped=ok sessions-started=0 sessions-ended=0 xen-slots-claimed=0 uptime=16.6",
        "VGPU-LAB host-proxy-end=alive uptime=16.6",
        "VGPU-LAB-DONE",
    ];

    #[test]
    fn a_good_run_passes_and_guest_lines_cannot_fake_markers() {
        let run = run_of(GOOD);
        assert_eq!(
            run.scenarios["hello"].console,
            ["vgpu-agent: starting /usr/bin/echo vgpu-lab-hello", "vgpu-lab-hello"]
        );
        assert_eq!(run.scenarios["hello"].exit_status.as_deref(), Some("0"));
        assert_eq!(run.scenarios["false"].console, ["VGPU-LAB scenario=hello guest-exit-status=7"]);
        assert_eq!(verdict(&options(), &run), Vec::<String>::new());
    }

    #[test]
    fn wrong_status_missing_line_and_errors_fail() {
        let lines: Vec<String> = GOOD
            .iter()
            .filter(|l| **l != "[domU] vgpu-lab-hello")
            .map(|l| l.replace("guest-exit-status=1", "guest-exit-status=139"))
            .chain(["VGPU-LAB scenario=false guest-error: cannot mount /proc".to_string()])
            .collect();
        let run = run_of(&lines.iter().map(String::as_str).collect::<Vec<_>>());
        let f = verdict(&options(), &run);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f[0].contains("hello") && f[0].contains("appeared inside"), "{f:?}");
        assert!(f[1].contains("139") && f[1].contains("cannot mount /proc"), "{f:?}");
    }

    #[test]
    fn a_destroyed_guest_passes_only_when_its_zone_ended() {
        let die = SCENARIOS.iter().find(|s| s.name == "die").expect("the die scenario");
        let opts = Options { scenarios: vec![die], ..options() };
        let lines = |cleanup: &str, ended: u32, scrape: &str| {
            vec![
                "VGPU-LAB host-proxy=alive pid=1 socket=/tmp/s uptime=1".to_string(),
                "VGPU-LAB scenario=die begin domain=d config=/d.cfg uptime=2".into(),
                "[domU] holding-gpu-memory".into(),
                "VGPU-LAB scenario=die domain-destroyed after=3 uptime=5".into(),
                format!("VGPU-LAB scenario=die host-cleanup={cleanup} after=3.5 uptime=5.5"),
                "VGPU-LAB scenario=die end uptime=6".into(),
                format!("VGPU-LAB metrics {scrape} uptime=7"),
                format!("VGPU-LAB zones started=1 ended={ended} uptime=7"),
                "VGPU-LAB host-proxy-end=alive uptime=8".into(),
                "VGPU-LAB-DONE".into(),
            ]
        };
        let verdict_of = |l: Vec<String>| verdict(&opts, &run_of(&l.iter().map(String::as_str).collect::<Vec<_>>()));
        let good = "scraped=ok sessions-started=1 sessions-ended=1 xen-slots-claimed=1";
        assert_eq!(verdict_of(lines("ok", 1, good)), Vec::<String>::new());
        let f = verdict_of(lines("missing", 1, good));
        assert!(f.iter().any(|f| f.contains("did not end the zone")), "{f:?}");
        let f = verdict_of(lines("ok", 0, good));
        assert!(f.iter().any(|f| f.contains("outlived its guest")), "{f:?}");
        // The metrics must agree: every session ended, a slot claimed for the CUDA scenario.
        let f = verdict_of(lines("ok", 1, "scraped=ok sessions-started=2 sessions-ended=1 xen-slots-claimed=1"));
        assert_eq!(f, ["the metrics show 2 sessions started but 1 ended: a session outlived its guest"]);
        let f = verdict_of(lines("ok", 1, "scraped=ok sessions-started=1 sessions-ended=1 xen-slots-claimed=0"));
        assert_eq!(f, ["the metrics show 0 Xen slots claimed for 1 CUDA scenarios"]);
        let f = verdict_of(lines("ok", 1, "scraped=failed"));
        assert_eq!(f, ["host-proxy's metrics endpoint did not answer in dom0"]);
    }

    #[test]
    fn a_restart_passes_only_with_a_new_daemon_and_no_old_workers() {
        let restart = SCENARIOS.iter().find(|s| s.name == "restart").expect("the restart scenario");
        let cuda = SCENARIOS.iter().find(|s| s.name == "cuda").expect("the cuda scenario");
        let opts = Options { scenarios: vec![cuda, restart], ..options() };
        let lines = |restarted: &str, status: u32, claimed: u32| {
            let before = if restarted.contains("before=0") { 0 } else { 1 };
            vec![
                "VGPU-LAB host-proxy=alive pid=1 socket=/tmp/s uptime=1".to_string(),
                "VGPU-LAB scenario=cuda begin domain=c config=/c.cfg uptime=2".into(),
                "[domU] suite: all scenarios passed".into(),
                "VGPU-LAB scenario=cuda domain-shutdown after=3 uptime=5".into(),
                "VGPU-LAB scenario=cuda guest-state=exited guest-exit-status=0 expected-exit-status=0 uptime=5".into(),
                "VGPU-LAB scenario=cuda end uptime=6".into(),
                "VGPU-LAB scenario=restart begin domain=r config=/r.cfg uptime=7".into(),
                "[domU] calling-the-host".into(),
                format!("VGPU-LAB scenario=restart workers-before-kill={before} uptime=8"),
                format!("VGPU-LAB scenario=restart {restarted} pid=9 uptime=8"),
                "[domU] host-gone".into(),
                "VGPU-LAB scenario=restart domain-shutdown after=3 uptime=9".into(),
                format!("VGPU-LAB scenario=restart guest-state=exited guest-exit-status={status} expected-exit-status=3 uptime=9"),
                "VGPU-LAB scenario=restart end uptime=10".into(),
                format!("VGPU-LAB metrics scraped=ok sessions-started=0 sessions-ended=0 xen-slots-claimed={claimed} uptime=11"),
                "VGPU-LAB zones started=0 ended=0 uptime=11".into(),
                "VGPU-LAB host-proxy-end=alive uptime=12".into(),
                "VGPU-LAB-DONE".into(),
            ]
        };
        let verdict_of = |l: Vec<String>| verdict(&opts, &run_of(&l.iter().map(String::as_str).collect::<Vec<_>>()));
        // The new daemon counts nothing of the scenarios before it: no slot claim is owed.
        assert_eq!(verdict_of(lines("host-proxy-restarted=alive old-workers=0", 3, 0)), Vec::<String>::new());
        let f = verdict_of(lines("host-proxy-restarted=alive old-workers=1", 3, 0));
        assert!(f.iter().any(|f| f.contains("workers of the old daemon left: 1")), "{f:?}");
        // A count that saw not even the guest's worker proves nothing.
        let f = verdict_of(lines("host-proxy-restarted=alive old-workers=0 before=0", 3, 0));
        assert!(f.iter().any(|f| f.contains("counted 0 workers before the kill")), "{f:?}");
        let f = verdict_of(lines("host-proxy-restarted=dead old-workers=0", 3, 0));
        assert!(f.iter().any(|f| f.contains("restarted: dead")), "{f:?}");
        let f = verdict_of(lines("other=1", 3, 0));
        assert!(f.iter().any(|f| f.contains("was not restarted")), "{f:?}");
        let f = verdict_of(lines("host-proxy-restarted=alive old-workers=0", 1, 0));
        assert!(f.iter().any(|f| f.contains("exit status 1")), "{f:?}");
    }

    #[test]
    fn an_unfinished_run_fails() {
        let run = run_of(&GOOD[..6]);
        let f = verdict(&options(), &run);
        assert!(f.iter().any(|f| f.contains("hello: did not finish")), "{f:?}");
        assert!(f.iter().any(|f| f.contains("false: never started")), "{f:?}");
        assert!(f.iter().any(|f| f.contains("VGPU-LAB-DONE")), "{f:?}");
    }
}
