//! `cargo xtask`: the project's build tasks in one binary (no logic in shell scripts).
//!
//! * `cargo xtask ci`    — everything CI checks: format, clippy (warnings denied), all
//!   tests, the loom model, miri over the ring tests and host-proxy's and libvgpu's pure parts, the bare-metal build of idm-core,
//!   docs with warnings denied. Installs missing rustup targets and components first.
//! * `cargo xtask fuzz [SECONDS]` — runs each cargo-fuzz target (idm-core's, host-proxy's) briefly.
//! * `cargo xtask bench` — the idm round-trip/throughput benchmark over shared memory.
//! * `cargo xtask codegen [--check]` — regenerates libvgpu's entry points, the wire
//!   messages and the host dispatcher from `guest-agent/libvgpu/api.toml`.
//! * `cargo xtask device-build` — release builds of what `device/*.sh` run on the GPU
//!   machine (host-proxy, libvgpu as libcuda.so.1, the cudarc test program, host-proxy's
//!   test binaries), stripped,
//!   in `.device-carry/` (ignored by git; name it in the device tool's `carry`).
//! * `cargo xtask build-image [OPTIONS]` — the guest image (kernel from kernel-config/,
//!   initramfs with the agent as /init and libvgpu as libcuda.so.1, xl config); see
//!   `image/mod.rs`. `cargo xtask check-image [DIR]` runs its checks on a built image.
//! * `cargo xtask xen-lab [--shell]` — boots Xen and a dom0 under QEMU (TCG) and runs
//!   guest scenarios in domUs made by build-image, a CUDA program over the Xen ring among
//!   them; see `xenlab.rs`.
//! * `cargo xtask demo`  — the main job with its embedded defaults: host-proxy (simulated GPU
//!   test double) serving one raw guest session and an unmodified cudarc program through
//!   libvgpu over the local transport.

mod codegen;
mod cudart;
mod image;
mod xenlab;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const BARE_METAL_TARGET: &str = "x86_64-unknown-none";
/// host-proxy's unit tests that run under Miri (test-name filters).
const MIRI_HOST_PROXY_TESTS: &[&str] = &[
    "handles::",
    "image::",
    "events::",
    "status::",
    "device_output::",
    "broker::",
    "worker::tests::request_profile_reports",
    "backend::cuda::tests::module_images",
    "backend::cuda::tests::launch_attributes",
    "backend::cuda::tests::device_names",
    "backend::cuda::tests::error_messages",
    "zone::graphs::",
];

/// cargo-fuzz targets: (fuzz workspace, target).
const FUZZ_TARGETS: &[(&str, &str)] = &[
    ("idm-core/fuzz", "frame_decode"),
    ("idm-core/fuzz", "ring_ops"),
    ("host-proxy/fuzz", "zone_requests"),
    ("host-proxy/fuzz", "module_image"),
    ("host-proxy/fuzz", "xen_offer"),
    ("host-proxy/fuzz", "xenstore_replies"),
    ("host-proxy/fuzz", "broker_frames"),
];

/// xen-vgpu build tasks.
#[derive(clap::Parser)]
#[command(name = "cargo xtask", about)]
enum Task {
    /// Everything CI checks (installs missing targets, components and packages first).
    Ci,
    /// Runs each cargo-fuzz target (idm-core's and host-proxy's) briefly.
    Fuzz {
        /// Seconds per target.
        #[arg(default_value_t = 20)]
        seconds: u64,
    },
    /// The idm round-trip/throughput benchmark over shared memory.
    Bench,
    /// The main job with its embedded defaults (simulated GPU, local transport).
    Demo,
    /// Regenerates the code made from guest-agent/libvgpu/api.toml.
    Codegen {
        /// Fail if the committed output is stale instead of writing it.
        #[arg(long)]
        check: bool,
    },
    /// Release builds of what device/*.sh run on the GPU machine, in .device-carry/.
    DeviceBuild,
    /// Downloads NVIDIA's CUDA runtime wheels (pinned) for the runtime tests; prints where.
    FetchCudart,
    /// Builds the guest image: kernel, initramfs, xl config.
    BuildImage(image::ImageOptions),
    /// Boots Xen + a dom0 under QEMU and runs guest scenarios in domUs (the Xen lab).
    XenLab(xenlab::LabOptions),
    /// Checks a built guest image folder (what build-image checks at its end).
    CheckImage {
        /// The image folder.
        #[arg(default_value = "target/guest-image")]
        dir: PathBuf,
        /// The domain name the xl config was made for.
        #[arg(long, default_value = "vgpu-guest")]
        name: String,
    },
}

fn main() -> Result<()> {
    use clap::Parser;
    // `cargo xtask` runs the binary as `xtask`; clap sees its own arguments only.
    let task = Task::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("cannot enter {}", root.display()))?;
    match task {
        Task::Ci => ci(),
        Task::Fuzz { seconds } => fuzz(seconds),
        Task::Bench => run(cargo().args(["bench", "-p", "idm-shm", "--bench", "roundtrip"])),
        Task::Demo => demo(),
        Task::Codegen { check } => codegen::main(&if check { vec!["--check".to_string()] } else { vec![] }),
        Task::DeviceBuild => device_build(),
        Task::FetchCudart => cudart::fetch().map(|d| println!("{}", d.display())),
        Task::BuildImage(opts) => image::build(&opts).map(drop),
        Task::XenLab(opts) => xenlab::main(&opts),
        Task::CheckImage { dir, name } => {
            image::check::check_image(&dir, &name)?;
            println!("{}: all image checks passed", dir.display());
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Runs one CI step, timing it, so the log shows where the time goes.
fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("==> {name}");
    let t = Instant::now();
    let r = f();
    eprintln!("<== {name}: {} in {:.1}s", if r.is_ok() { "ok" } else { "FAILED" }, t.elapsed().as_secs_f64());
    r
}

fn has_nightly_miri() -> bool {
    Command::new("cargo").args(["+nightly", "miri", "--version"]).output().map(|o| o.status.success()).unwrap_or(false)
}

fn ci() -> Result<()> {
    use clap::Parser;
    step("install rustup targets and components", || {
        run(Command::new("rustup").args(["target", "add", BARE_METAL_TARGET]))?;
        run(Command::new("rustup").args(["component", "add", "clippy", "rustfmt"]))?;
        if !has_nightly_miri() {
            // Miri needs a nightly toolchain; install it where rustup can.
            let _ = Command::new("rustup")
                .args(["toolchain", "install", "nightly", "--profile", "minimal", "-c", "miri", "-c", "rust-src"])
                .status();
        }
        Ok(())
    })?;
    step("install Debian packages the guest image, the Xen lab and the containerd test need", || {
        apt_install(&missing_packages(&[IMAGE_PACKAGES, SHIM_TEST_PACKAGES].concat()))
    })?;
    step("format", || run(cargo().args(["fmt", "--all", "--", "--check"])))?;
    step("clippy", || {
        run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
        // idm-xen without its grant code: what the guest agent links (the workspace build
        // above unifies the feature on).
        run(cargo().args(["clippy", "-p", "idm-xen", "--no-default-features", "--all-targets", "--", "-D", "warnings"]))
    })?;
    let cudart = std::cell::RefCell::new(PathBuf::new());
    step("NVIDIA's CUDA runtime 12.9 and 13.0 from PyPI (cached in ~/.cache/xen-vgpu)", || {
        *cudart.borrow_mut() = cudart::fetch()?;
        Ok(())
    })?;
    step("tests", || {
        let mut test = cargo();
        test.args(["test", "--workspace"]).env("VGPU_CUDART_DIR", &*cudart.borrow());
        if is_root() {
            // The shim's containerd test runs a private containerd; as root CI has installed
            // what it needs, so a missing piece fails it instead of skipping it.
            test.env("XENVGPU_REQUIRE_CONTAINERD", "1");
        }
        run(&mut test)
    })?;
    step("idm-core bare-metal build", || {
        run(cargo().args(["build", "-p", "idm-core", "--target", BARE_METAL_TARGET]))?;
        run(cargo().args(["build", "-p", "idm-core", "--target", BARE_METAL_TARGET, "--features", "defmt"]))
    })?;
    step("docs", || run(cargo().args(["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings")))?;
    step("loom model of the ring", || {
        run(cargo()
            .args(["test", "-p", "idm-core", "--release", "--test", "loom_ring", "--target-dir", "target/loom"])
            .env("RUSTFLAGS", "--cfg loom"))
    })?;
    step("miri over the ring and channel tests, and host-proxy's and libvgpu's pure parts", || {
        if !has_nightly_miri() {
            eprintln!("SKIPPED: no nightly toolchain with miri could be installed on this machine");
            return Ok(());
        }
        // Miri's weak-memory emulation crashes (an internal panic in weak_memory.rs, nightly
        // 2026-05) on the threaded channel tests' mixed-size atomics; data-race and UB
        // checking stay on.
        // `+nightly` is understood by rustup's `cargo` proxy, not by a toolchain's cargo.
        run(Command::new("cargo")
            .args(["+nightly", "miri", "test", "-p", "idm-core", "--lib", "--target-dir", "target/miri"])
            .env("MIRIFLAGS", "-Zmiri-disable-weak-memory-emulation"))?;
        // The parts of host-proxy and libvgpu that make no foreign calls (handle tables,
        // module images, the event log, the window arena and copies, the export tables'
        // local slots, …), with strict provenance. Left out: what needs memfd, dlopen or
        // sockets (zones, the simulated GPU, the ledger), and tests too slow under Miri.
        let strict = "-Zmiri-disable-weak-memory-emulation -Zmiri-strict-provenance";
        run(Command::new("cargo")
            .args(["+nightly", "miri", "test", "-p", "host-proxy", "--lib", "--target-dir", "target/miri", "--"])
            .args(MIRI_HOST_PROXY_TESTS)
            .args(["--skip", "broker_serves_workers_over_socket_pairs"])
            .env("MIRIFLAGS", strict))?;
        run(Command::new("cargo")
            .args(["+nightly", "miri", "test", "-p", "libvgpu", "--lib", "--target-dir", "target/miri"])
            .env("MIRIFLAGS", strict))
    })?;
    step("guest image: build (kernel cached in ~/.cache/xen-vgpu) and check", || {
        let opts = image::ImageOptions::parse_from(["build-image", "--out", "target/guest-image-ci"]);
        let built = image::build(&opts)?;
        let total = built.kernel_bytes + built.initramfs_bytes;
        if total > image::BASE_IMAGE_GOAL_BYTES {
            bail!("the base image is {}, over its {} goal", image::mb(total), image::mb(image::BASE_IMAGE_GOAL_BYTES));
        }
        Ok(())
    })?;
    step("Xen lab: Xen + dom0 under QEMU, the guest images in domUs, CUDA over the Xen ring", || {
        let opts = xenlab::LabOptions::parse_from(["xen-lab", "--keep-going"]);
        xenlab::main(&opts)
    })?;
    eprintln!("ci: all steps passed");
    Ok(())
}

/// (command that shows the package is there, Debian package) pairs the image build needs.
const IMAGE_PACKAGES: &[(&str, &str)] = &[
    ("make", "make"),
    ("gcc", "gcc"),
    ("flex", "flex"),
    ("bison", "bison"),
    ("bc", "bc"),
    ("perl", "perl"),
    ("xz", "xz-utils"),
    ("strip", "binutils"),
    ("/usr/include/gelf.h", "libelf-dev"),
    (image::kernel::DEBIAN_SOURCE, "linux-source-6.1"),
];

/// (probe, Debian package) pairs the shim's containerd test needs: a private containerd with
/// `ctr`, a static busybox for the image it builds, protoc for its CRI client's protos, and
/// erofs-utils for the zone images.
const SHIM_TEST_PACKAGES: &[(&str, &str)] = &[
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("busybox", "busybox-static"),
    ("protoc", "protobuf-compiler"),
    ("mkfs.erofs", "erofs-utils"),
    ("fsck.erofs", "erofs-utils"),
];

/// Whether this process runs as root.
pub(crate) fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0\n")).unwrap_or(false)
}

/// The Debian packages of `wanted` whose probe — a command on PATH, or an absolute file
/// path — is missing (each package once).
pub(crate) fn missing_packages(wanted: &[(&str, &'static str)]) -> Vec<&'static str> {
    let mut missing: Vec<&'static str> = Vec::new();
    for (probe, pkg) in wanted {
        let present = if probe.starts_with('/') { Path::new(probe).exists() } else { image::which(probe).is_some() };
        if !present && !missing.contains(pkg) {
            missing.push(pkg);
        }
    }
    missing
}

/// Installs Debian packages with apt-get (CI runs as root on a fresh machine); elsewhere
/// fails saying what to install.
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages: {} (apt-get install {})", packages.join(" "), packages.join(" "));
    }
    eprintln!("installing {}", packages.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn fuzz(seconds: u64) -> Result<()> {
    let has_fuzz = Command::new("cargo").args(["+nightly", "fuzz", "--version"]).output().map(|o| o.status.success());
    if !matches!(has_fuzz, Ok(true)) {
        eprintln!("==> installing cargo-fuzz (one time)");
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    for (dir, target) in FUZZ_TARGETS {
        step(&format!("fuzz {target} ({dir}) for {seconds}s"), || {
            // New inputs go to a scratch corpus first, so the committed one only grows by
            // choice (`cargo fuzz cmin` then copy).
            let scratch = format!("target/fuzz-corpus/{target}");
            std::fs::create_dir_all(Path::new(dir).join(&scratch))?;
            run(Command::new("cargo")
                .current_dir(dir)
                .args(["+nightly", "fuzz", "run", target, &scratch, &format!("corpus/{target}"), "--"])
                .arg(format!("-max_total_time={seconds}")))
        })?;
    }
    Ok(())
}

/// Starts host-proxy with its embedded default configuration (the simulated GPU), runs one
/// guest session against it, and stops the daemon.
fn demo() -> Result<()> {
    run(cargo().args(["build", "--release", "-p", "host-proxy", "--bin", "host-proxy", "--example", "guest_session"]))?;
    run(cargo().args(["build", "--release", "-p", "libvgpu", "--lib", "--example", "cudarc_app"]))?;
    let dir = std::env::temp_dir().join("xen-vgpu-demo");
    std::fs::create_dir_all(&dir)?;
    // libvgpu under the names CUDA applications load.
    let libdir = dir.join("lib");
    std::fs::create_dir_all(&libdir)?;
    let so = std::fs::canonicalize("target/release/libcuda.so")?;
    for name in ["libcuda.so", "libcuda.so.1"] {
        let link = libdir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&so, &link)?;
    }
    let socket = dir.join("host-proxy.sock");
    let admin = dir.join("host-proxy.sock.admin");
    eprintln!("==> starting host-proxy (embedded default config, simulated GPU) on {}", socket.display());
    let mut daemon = Command::new("target/release/host-proxy").arg("serve").arg("--socket").arg(&socket).spawn()?;
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&admin).is_err() {
        if Instant::now() > deadline || daemon.try_wait()?.is_some() {
            let _ = daemon.kill();
            bail!("host-proxy did not come up on {}", socket.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    eprintln!("==> running a guest session (raw protocol)");
    let mut result = run(Command::new("target/release/examples/guest_session").arg(&socket));
    let ptx = Path::new("guest-agent/libvgpu/tests/fixtures/sim_kernels.ptx");
    for args in [vec!["device"], vec!["copy"], vec!["launch", ptx.to_str().unwrap_or_default()]] {
        if result.is_err() {
            break;
        }
        eprintln!("==> an unmodified cudarc program through libvgpu (libcuda.so.1): cudarc_app {}", args.join(" "));
        result = run(Command::new("target/release/examples/cudarc_app")
            .args(&args)
            .env("LD_LIBRARY_PATH", &libdir)
            .env("VGPU_SOCKET", &socket));
    }
    let _ = Command::new("kill").args(["-TERM", &daemon.id().to_string()]).status();
    let status = daemon.wait()?;
    eprintln!("==> host-proxy stopped ({status})");
    result
}

/// Runs `cargo <args> --message-format=json` (building `what`) and returns its messages.
fn cargo_json(args: &[&str], what: &str) -> Result<String> {
    let out = cargo()
        .args(args)
        .arg("--message-format=json")
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("building {what}"))?;
    if !out.status.success() {
        bail!("building {what} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds and collects the binaries the on-device scripts run (see `device/`).
fn device_build() -> Result<()> {
    let carry = PathBuf::from(".device-carry");
    std::fs::create_dir_all(carry.join("libvgpu")).context("creating .device-carry")?;
    run(cargo().args(["build", "--release", "-p", "host-proxy", "-p", "libvgpu"]))?;
    run(cargo().args(["build", "--release", "-p", "libvgpu", "--example", "cudarc_app"]))?;
    // The tracer (tools/cuda-trace): its own file name, so it never overwrites libvgpu's
    // libcuda.so in target/; carried as libcuda.so for device/cuda-trace.sh.
    std::fs::create_dir_all(carry.join("cuda-trace")).context("creating .device-carry/cuda-trace")?;
    run(cargo().args(["build", "--release", "-p", "cuda-trace", "--lib"]))?;
    let mut copies = vec![
        (PathBuf::from("target/release/libcuda_trace.so"), carry.join("cuda-trace/libcuda.so")),
        (PathBuf::from("target/release/host-proxy"), carry.join("host-proxy")),
        (PathBuf::from("target/release/libcuda.so"), carry.join("libvgpu/libcuda.so.1")),
        (PathBuf::from("target/release/examples/cudarc_app"), carry.join("cudarc_app")),
    ];
    let tests = cargo_json(&["test", "--release", "-p", "host-proxy", "--no-run"], "host-proxy's tests")?;
    let bench =
        cargo_json(&["bench", "-p", "idm-shm", "--bench", "roundtrip", "--no-run"], "idm-shm's round-trip benchmark")?;
    for line in tests.lines().chain(bench.lines()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(exe), Some(name)) = (v["executable"].as_str(), v["target"]["name"].as_str()) else { continue };
        let kind = v["target"]["kind"][0].as_str().unwrap_or("");
        let dest = match (kind, name) {
            ("lib", _) => "host_proxy_lib_tests",
            ("test", "zones") => "zones_test",
            ("bench", "roundtrip") => "shm_roundtrip",
            _ => continue,
        };
        copies.push((PathBuf::from(exe), carry.join(dest)));
    }
    for (from, to) in &copies {
        std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        // Debug info would not fit the device tool's carry limit; the symbol table stays, so
        // a profile on the device names our functions.
        if Command::new("strip").arg("--strip-debug").arg(to).status().map(|s| !s.success()).unwrap_or(true) {
            eprintln!("warning: could not strip {} (install binutils)", to.display());
        }
        let size = std::fs::metadata(to)?.len();
        println!("{:>8.1} MiB  {}", size as f64 / (1 << 20) as f64, to.display());
    }
    Ok(())
}
