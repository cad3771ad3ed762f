//! `cargo xtask build-image`: the guest image — a Linux kernel built from
//! `kernel-config/`, a gzip initramfs (the static guest agent as `/init`, libvgpu as
//! `libcuda.so.1`, the applications and the shared libraries they need) and an `xl`
//! config for a PV guest — then the checks every image must pass.
//!
//! The rootfs is assembled in memory ([`cpio::Tree`]) and written as a deterministic
//! `newc` archive: no staging directory, no root privileges for `/dev/console`.
//! See `rootfs/README.md` for what goes in and why.

pub mod check;
pub mod cpio;
pub mod kernel;
mod progress;

use anyhow::{bail, ensure, Context, Result};
use cpio::{Node, Tree};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where libvgpu goes: where NVIDIA's driver installs `libcuda.so.1` on Debian and Ubuntu,
/// and one of glibc's built-in search directories (the image has no `ld.so.cache`).
pub const LIBCUDA_DIR: &str = "/usr/lib/x86_64-linux-gnu";
/// The musl target the guest agent is built for (a static executable).
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-musl";
/// Hard bound on the whole image (kernel + initramfs).
pub const MAX_IMAGE_BYTES: u64 = 50 * 1000 * 1000;
/// What a base image (no application) should stay under.
pub const BASE_IMAGE_GOAL_BYTES: u64 = 20 * 1000 * 1000;

/// Options of `cargo xtask build-image`.
#[derive(clap::Parser, Debug, Clone)]
pub struct ImageOptions {
    /// Output folder (vmlinuz, initramfs.cpio.gz, NAME.cfg, kernel.config, manifest.txt).
    #[arg(long, default_value = "target/guest-image")]
    pub out: PathBuf,
    /// Domain name in the xl config.
    #[arg(long, default_value = "vgpu-guest")]
    pub name: String,
    /// An application to include, installed as `/usr/bin/<file name>` with the shared
    /// libraries `ldd` finds for it. Repeatable.
    #[arg(long = "app", value_name = "PATH")]
    pub apps: Vec<PathBuf>,
    /// An extra shared library to include at its own path (for what applications
    /// `dlopen`, which `ldd` cannot see). Repeatable.
    #[arg(long = "lib", value_name = "PATH")]
    pub libs: Vec<PathBuf>,
    /// The workload the guest agent starts, put on the kernel command line (`vgpu.run`):
    /// a program path and arguments separated by spaces. Without it the agent reads
    /// `vgpu/run` from the domain's xenstore directory.
    #[arg(long)]
    pub run: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u32,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Data window of each CUDA process, in MiB (libvgpu's `VGPU_WINDOW_MB`): copies are
    /// staged and pinned host memory is carved from it; over Xen every 4 KiB of it is a
    /// grant. A power of two, at most 128 (the channel's 64 directory pages).
    #[arg(long, default_value_t = 64)]
    pub window_mib: u32,
    /// CUDA processes that may hold a session at once (at most host-proxy's `xen_slots`,
    /// default 4): the guest's grant table (`max_grant_frames`) is sized for them.
    #[arg(long, default_value_t = 1)]
    pub cuda_processes: u32,
    /// Folder the xl config names for the kernel and ramdisk (where the files will be in the
    /// domain that runs `xl create`); default: the output folder's absolute path.
    #[arg(long)]
    pub boot_dir: Option<PathBuf>,
    /// More kernel command line.
    #[arg(long, default_value = "")]
    pub extra_cmdline: String,
    /// Linux source: a tarball or an unpacked tree (default: Debian's linux-source-6.1).
    #[arg(long)]
    pub kernel_source: Option<PathBuf>,
    /// Parallel kernel build jobs (default: the number of CPUs).
    #[arg(long)]
    pub jobs: Option<usize>,
}

/// What a build produced, with sizes.
#[derive(Debug)]
pub struct Built {
    /// The output folder.
    pub out: PathBuf,
    /// Compressed kernel size in bytes.
    pub kernel_bytes: u64,
    /// Compressed initramfs size in bytes.
    pub initramfs_bytes: u64,
    /// The xl config path.
    pub xl_config: PathBuf,
}

/// `$XEN_VGPU_CACHE` or `~/.cache/xen-vgpu`: kernel builds and lab assets live here, so a
/// fresh clone on the same machine reuses them.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XEN_VGPU_CACHE") {
        return Ok(PathBuf::from(d));
    }
    let home = std::env::var_os("HOME").context("HOME is not set; set XEN_VGPU_CACHE")?;
    Ok(PathBuf::from(home).join(".cache/xen-vgpu"))
}

/// Fails with the Debian package to install when `tool` is not on PATH.
pub fn need_tool(tool: &str, package: &str) -> Result<()> {
    if which(tool).is_none() {
        bail!("`{tool}` is needed but not installed: install Debian's package {package} (apt-get install {package})");
    }
    Ok(())
}

/// The path of `tool` on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// 64-bit FNV-1a, for cache keys.
pub fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// Runs `cmd`, keeping its output unless it fails (then shows the tail).
pub fn run_quiet(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{what}: could not start {cmd:?}"))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("{what} failed ({}):\n{}", out.status, tail.join("\n"));
    }
    Ok(())
}

/// Splits and checks the workload command (it travels inside a double-quoted kernel
/// parameter inside a single-quoted xl string, so neither quote can appear in it).
pub fn parse_run(run: &str) -> Result<Vec<String>> {
    if let Some(c) = run.chars().find(|c| matches!(c, '"' | '\'' | '\\') || c.is_control()) {
        bail!("--run cannot contain {c:?} (it goes on the kernel command line); put such workloads in xenstore (vgpu/run)");
    }
    let argv: Vec<String> = run.split_whitespace().map(str::to_string).collect();
    ensure!(!argv.is_empty(), "--run is empty");
    ensure!(argv[0].starts_with('/'), "--run must start with an absolute program path, got {:?}", argv[0]);
    Ok(argv)
}

/// The kernel command line of the guest.
pub fn kernel_cmdline(opts: &ImageOptions) -> Result<String> {
    // gntalloc's default limit (1024 pages) is far below one channel's region (ring pages
    // plus the data window): raise it to what the processes need, 65536 at least.
    let grants = GrantSizing::of(opts)?.grants.max(65536);
    let mut cmdline =
        format!("console=hvc0 quiet xen_gntalloc.limit={grants} vgpu.env=VGPU_WINDOW_MB={}", opts.window_mib);
    if let Some(run) = &opts.run {
        cmdline.push_str(&format!(" vgpu.run=\"{}\"", parse_run(run)?.join(" ")));
    }
    if !opts.extra_cmdline.is_empty() {
        ensure!(
            !opts.extra_cmdline.contains('\'') && !opts.extra_cmdline.chars().any(char::is_control),
            "--extra-cmdline cannot contain ' or control characters"
        );
        cmdline.push(' ');
        cmdline.push_str(&opts.extra_cmdline);
    }
    Ok(cmdline)
}

/// libvgpu's ring size each way (`rt.rs`, `RING_SIZE`).
const LIBVGPU_RING_SIZE: usize = 1 << 20;
/// Grant references per directory page, and the most directory pages a frontend may use
/// (`idm_xen::channel::{REFS_PER_DIR_PAGE, MAX_DIR_PAGES}`).
const REFS_PER_DIR_PAGE: usize = 1024;
const MAX_DIR_PAGES: usize = 64;
/// Grant entries per grant-table frame (version 1 entries, 8 bytes, in a 4 KiB frame).
const GRANTS_PER_FRAME: usize = 512;
/// Xen's default `gnttab_max_frames`: a domain's `max_grant_frames` above it needs Xen
/// booted with a larger one.
const XEN_DEFAULT_GNTTAB_MAX_FRAMES: u32 = 64;

/// How many grants the guest's CUDA processes need over Xen, and the grant-table frames
/// (`max_grant_frames`) that hold them.
#[derive(Debug, PartialEq, Eq)]
pub struct GrantSizing {
    /// Grants of all the processes' channel regions and directory pages.
    pub grants: usize,
    /// Grant-table frames for them plus the kernel's own grants (console, xenstore).
    pub frames: u32,
}

impl GrantSizing {
    /// The sizing for `opts.cuda_processes` processes with `opts.window_mib` windows: each
    /// grants every page of its region (control page, two rings, the window) and the
    /// directory pages that list them.
    pub fn of(opts: &ImageOptions) -> Result<GrantSizing> {
        ensure!(opts.window_mib.is_power_of_two(), "--window-mib must be a power of two (1, 2, 4, … 128)");
        ensure!(
            (1..=64).contains(&opts.cuda_processes),
            "--cuda-processes must be 1..=64 (host-proxy offers at most 64 slots)"
        );
        let layout = idm_shm::ChannelLayout::new(LIBVGPU_RING_SIZE, (opts.window_mib as usize) << 20)
            .map_err(|e| anyhow::anyhow!("--window-mib {}: {e}", opts.window_mib))?;
        let pages = layout.total_size().div_ceil(4096);
        let dir = pages.div_ceil(REFS_PER_DIR_PAGE);
        ensure!(
            dir <= MAX_DIR_PAGES,
            "--window-mib {}: a channel region of {pages} pages needs {dir} directory pages, over the {MAX_DIR_PAGES} the Xen handshake allows (128 MiB at most)",
            opts.window_mib
        );
        let grants = (pages + dir) * opts.cuda_processes as usize;
        // The kernel's own grants (console and xenstore rings, a few more) fit in one frame.
        let frames = u32::try_from(grants.div_ceil(GRANTS_PER_FRAME) + 1)?;
        Ok(GrantSizing { grants, frames })
    }
}

/// The xl config for a PV guest. Values are single-quoted (xl takes them literally).
pub fn xl_config(opts: &ImageOptions, boot_dir: &Path) -> Result<String> {
    ensure!(
        !opts.name.is_empty()
            && opts.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'),
        "--name must be letters, digits, '-', '_' or '.'"
    );
    ensure!(opts.memory >= 64, "--memory {} MiB is too small for the guest (at least 64)", opts.memory);
    ensure!((1..=64).contains(&opts.vcpus), "--vcpus must be 1..=64 (the kernel's NR_CPUS)");
    let dir = boot_dir.to_str().context("--boot-dir must be UTF-8")?;
    ensure!(!dir.contains('\''), "--boot-dir cannot contain '");
    Ok(format!(
        "# xen-vgpu guest, generated by `cargo xtask build-image`. Start it with: xl create <this file>\n\
         name = '{name}'\n\
         type = 'pv'\n\
         kernel = '{dir}/vmlinuz'\n\
         ramdisk = '{dir}/initramfs.cpio.gz'\n\
         extra = '{cmdline}'\n\
         memory = {memory}\n\
         vcpus = {vcpus}\n\
         max_grant_frames = {frames}\n\
         on_poweroff = 'destroy'\n\
         on_reboot = 'destroy'\n\
         on_crash = 'destroy'\n",
        name = opts.name,
        cmdline = kernel_cmdline(opts)?,
        memory = opts.memory,
        vcpus = opts.vcpus,
        frames = GrantSizing::of(opts)?.frames,
    ))
}

fn cargo_build(args: &[&str]) -> Result<()> {
    crate::run(crate::cargo().args(["build", "--release"]).args(args))
}

/// A copy of `path` with symbols stripped (debug info would double the image).
fn stripped(path: &Path) -> Result<Vec<u8>> {
    need_tool("strip", "binutils")?;
    let tmp = std::env::temp_dir().join(format!(
        "xen-vgpu-strip-{}-{}",
        std::process::id(),
        fnv64(path.as_os_str().as_encoded_bytes())
    ));
    run_quiet(Command::new("strip").arg("--strip-unneeded").arg("-o").arg(&tmp).arg(path), "strip")?;
    let data = std::fs::read(&tmp)?;
    let _ = std::fs::remove_file(&tmp);
    Ok(data)
}

/// The shared libraries `ldd` resolves for `elf` (absolute paths as the loader names
/// them), plus `libgcc_s.so.1` beside glibc's `libc.so.6` (glibc loads it at run time for
/// thread cancellation and unwinding; ldd cannot see that). libcuda is skipped: the image
/// provides libvgpu under that name.
pub fn shared_libs(elf: &Path) -> Result<Vec<PathBuf>> {
    need_tool("ldd", "libc-bin")?;
    let out = Command::new("ldd").arg(elf).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with("libcuda.so") || name.starts_with("linux-vdso") {
            continue;
        }
        if line.contains("not found") {
            bail!("{} needs {name}, which is not installed on this machine", elf.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => name,
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    let libgcc =
        libs.iter().find(|l| l.ends_with("libc.so.6")).and_then(|l| l.parent()).map(|d| d.join("libgcc_s.so.1"));
    if let Some(gcc) = libgcc.filter(|g| g.exists() && !libs.contains(g)) {
        libs.push(gcc);
    }
    Ok(libs)
}

fn add_file(tree: &mut Tree, at: &str, data: Vec<u8>, mode: u32) -> Result<()> {
    tree.insert(at, Node::File { mode, data })
}

/// Adds `elf`'s shared libraries.
fn add_libs(tree: &mut Tree, elf: &Path) -> Result<()> {
    for lib in shared_libs(elf)? {
        let at = lib.to_str().context("library path is not UTF-8")?.to_string();
        if tree.get(&at).is_none() {
            add_file(tree, &at, stripped(&lib)?, 0o755)?;
        }
    }
    Ok(())
}

/// The rootfs: directories, console node, /init, libvgpu, applications.
pub fn rootfs(agent: &Path, libvgpu: &Path, apps: &[PathBuf], libs: &[PathBuf]) -> Result<Tree> {
    let mut t = Tree::default();
    for d in ["/proc", "/sys", "/dev", "/run", "/root", "/usr/bin", "/etc"] {
        t.insert(d, Node::Dir { mode: 0o755 })?;
    }
    t.insert("/tmp", Node::Dir { mode: 0o1777 })?;
    // The kernel opens /dev/console for PID 1 before devtmpfs is mounted.
    t.insert("/dev/console", Node::CharDev { mode: 0o600, major: 5, minor: 1 })?;
    t.insert("/dev/null", Node::CharDev { mode: 0o666, major: 1, minor: 3 })?;
    t.insert("/etc/passwd", Node::File { mode: 0o644, data: b"root:x:0:0:root:/root:/init\n".to_vec() })?;
    t.insert("/etc/group", Node::File { mode: 0o644, data: b"root:x:0:\n".to_vec() })?;
    add_file(&mut t, "/init", stripped(agent)?, 0o755)?;
    // The kernel runs these for `xl shutdown` / `xl reboot`; the agent asks PID 1 to stop.
    for name in ["poweroff", "reboot", "halt"] {
        t.insert(&format!("/sbin/{name}"), Node::Symlink { target: "/init".into() })?;
    }
    add_file(&mut t, &format!("{LIBCUDA_DIR}/libcuda.so.1"), stripped(libvgpu)?, 0o755)?;
    t.insert(&format!("{LIBCUDA_DIR}/libcuda.so"), Node::Symlink { target: "libcuda.so.1".into() })?;
    add_libs(&mut t, libvgpu)?;
    for app in apps {
        let name =
            app.file_name().and_then(|n| n.to_str()).with_context(|| format!("bad app path {}", app.display()))?;
        let data = stripped(app).with_context(|| format!("reading the application {}", app.display()))?;
        add_file(&mut t, &format!("/usr/bin/{name}"), data, 0o755)?;
        add_libs(&mut t, app)?;
    }
    for lib in libs {
        let at = std::fs::canonicalize(lib).with_context(|| format!("--lib {}", lib.display()))?;
        let at_str = lib.to_str().context("--lib path is not UTF-8")?;
        ensure!(lib.is_absolute(), "--lib wants an absolute path, got {}", lib.display());
        add_file(&mut t, at_str, stripped(&at)?, 0o755)?;
        add_libs(&mut t, &at)?;
    }
    Ok(t)
}

/// Human-readable size.
pub fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

/// `cargo xtask build-image`.
pub fn build(opts: &ImageOptions) -> Result<Built> {
    let t0 = std::time::Instant::now();
    // Check everything cheap before the long steps.
    let xl_probe = xl_config(opts, Path::new("/"))?;
    drop(xl_probe);
    for app in &opts.apps {
        ensure!(app.is_file(), "--app {} is not a file", app.display());
    }
    let jobs = opts.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));

    eprintln!("==> guest agent (static, {AGENT_TARGET}) and libvgpu");
    crate::run(Command::new("rustup").args(["target", "add", AGENT_TARGET]).stdout(std::process::Stdio::null()))?;
    cargo_build(&["-p", "guest-agent", "--target", AGENT_TARGET])?;
    cargo_build(&["-p", "libvgpu", "--lib"])?;
    let agent = PathBuf::from(format!("target/{AGENT_TARGET}/release/guest-agent"));
    let libvgpu = PathBuf::from("target/release/libcuda.so");

    eprintln!("==> kernel");
    let k = kernel::build(opts.kernel_source.as_deref(), Path::new("kernel-config/guest.fragment"), jobs)?;

    eprintln!("==> rootfs");
    let tree = rootfs(&agent, &libvgpu, &opts.apps, &opts.libs)?;
    let cpio = tree.to_cpio()?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&cpio)?;
    let initramfs = gz.finish()?;

    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let out = std::fs::canonicalize(&opts.out)?;
    let boot_dir = opts.boot_dir.clone().unwrap_or_else(|| out.clone());
    std::fs::copy(&k.image, out.join("vmlinuz"))?;
    std::fs::copy(&k.config, out.join("kernel.config"))?;
    std::fs::write(out.join("initramfs.cpio.gz"), &initramfs)?;
    let xl_path = out.join(format!("{}.cfg", opts.name));
    std::fs::write(&xl_path, xl_config(opts, &boot_dir)?)?;
    let mut manifest = String::new();
    for (path, node) in tree.iter() {
        let line = match node {
            Node::Dir { .. } => format!("d            /{path}\n"),
            Node::File { data, .. } => format!("f {:>10} /{path}\n", data.len()),
            Node::Symlink { target } => format!("l            /{path} -> {target}\n"),
            Node::CharDev { major, minor, .. } => format!("c {major:>4},{minor:<5} /{path}\n"),
        };
        manifest.push_str(&line);
    }
    std::fs::write(out.join("manifest.txt"), manifest)?;

    let built = Built {
        kernel_bytes: std::fs::metadata(out.join("vmlinuz"))?.len(),
        initramfs_bytes: initramfs.len() as u64,
        xl_config: xl_path,
        out,
    };
    let total = built.kernel_bytes + built.initramfs_bytes;
    eprintln!("==> checks");
    check::check_image(&built.out, &opts.name)?;
    println!(
        "guest image in {} ({:.0} s)\n  kernel     {}\n  rootfs     {} (initramfs, gzip; {} unpacked)\n  total      {} (limit {}{})\n  xl config  {}\nstart it with: xl create {}",
        built.out.display(),
        t0.elapsed().as_secs_f64(),
        mb(built.kernel_bytes),
        mb(built.initramfs_bytes),
        mb(tree.file_bytes()),
        mb(total),
        mb(MAX_IMAGE_BYTES),
        if opts.apps.is_empty() { format!("; base image goal {}", mb(BASE_IMAGE_GOAL_BYTES)) } else { String::new() },
        built.xl_config.display(),
        built.xl_config.display(),
    );
    if opts.apps.is_empty() && total > BASE_IMAGE_GOAL_BYTES {
        eprintln!("warning: the base image is {} , over its {} goal", mb(total), mb(BASE_IMAGE_GOAL_BYTES));
    }
    let grants = GrantSizing::of(opts)?;
    println!(
        "  grants     {} for {} CUDA process(es) with {} MiB windows: max_grant_frames = {}",
        grants.grants, opts.cuda_processes, opts.window_mib, grants.frames
    );
    if grants.frames > XEN_DEFAULT_GNTTAB_MAX_FRAMES {
        eprintln!(
            "note: max_grant_frames = {} is over Xen's default limit ({XEN_DEFAULT_GNTTAB_MAX_FRAMES}): boot Xen with gnttab_max_frames={} or more, or xl create refuses the guest",
            grants.frames, grants.frames
        );
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ImageOptions {
        ImageOptions {
            out: "o".into(),
            name: "g1".into(),
            apps: vec![],
            libs: vec![],
            run: Some("/usr/bin/app --n 3".into()),
            memory: 256,
            vcpus: 2,
            window_mib: 64,
            cuda_processes: 1,
            boot_dir: None,
            extra_cmdline: "loglevel=3".into(),
            kernel_source: None,
            jobs: None,
        }
    }

    #[test]
    fn xl_config_has_the_keys_and_passes_the_check() {
        let cfg = xl_config(&opts(), Path::new("/srv/guest")).unwrap();
        let keys = check::parse_xl(&cfg).unwrap();
        assert_eq!(keys["kernel"], "/srv/guest/vmlinuz");
        assert_eq!(keys["ramdisk"], "/srv/guest/initramfs.cpio.gz");
        assert_eq!(
            keys["extra"],
            "console=hvc0 quiet xen_gntalloc.limit=65536 vgpu.env=VGPU_WINDOW_MB=64 vgpu.run=\"/usr/bin/app --n 3\" loglevel=3"
        );
        assert_eq!(keys["memory"], "256");
        // One process: 16384 window pages, 2 × 257 ring pages, the control page, 17
        // directory pages; 34 frames with the kernel's.
        assert_eq!(keys["max_grant_frames"], "35");
        check::check_xl(&cfg, "g1").unwrap();
    }

    #[test]
    fn the_grant_table_is_sized_for_the_processes_and_their_windows() {
        let sizing =
            |window_mib, cuda_processes| GrantSizing::of(&ImageOptions { window_mib, cuda_processes, ..opts() });
        let one = sizing(64, 1).unwrap();
        let four = sizing(64, 4).unwrap();
        assert_eq!(four.grants, 4 * one.grants);
        assert!(four.frames as usize * GRANTS_PER_FRAME >= four.grants + GRANTS_PER_FRAME - 1);
        assert!(four.frames > XEN_DEFAULT_GNTTAB_MAX_FRAMES, "four 64 MiB windows need Xen's limit raised");
        let big = sizing(128, 1).unwrap();
        assert!(big.grants > 128 * 256 && big.frames > XEN_DEFAULT_GNTTAB_MAX_FRAMES, "{big:?}");
        let err = sizing(256, 1).unwrap_err().to_string();
        assert!(err.contains("directory pages"), "{err}");
        assert!(sizing(96, 1).unwrap_err().to_string().contains("power of two"));
        assert!(sizing(0, 1).is_err() && sizing(64, 0).is_err() && sizing(64, 65).is_err());
        // gntalloc's limit follows when the processes need more than the default.
        let cmdline = kernel_cmdline(&ImageOptions { window_mib: 128, cuda_processes: 2, ..opts() }).unwrap();
        let limit = sizing(128, 2).unwrap().grants;
        assert!(cmdline.contains(&format!("xen_gntalloc.limit={limit} ")), "{cmdline}");
    }

    #[test]
    fn workloads_that_cannot_travel_on_the_command_line_are_refused() {
        for bad in ["app", "/bin/x \"q\"", "/bin/x it's", "/bin/x a\\b", "", "/bin/x\n"] {
            assert!(parse_run(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_run(" /bin/x  a b ").unwrap(), ["/bin/x", "a", "b"]);
        let mut o = opts();
        o.name = "bad name".into();
        assert!(xl_config(&o, Path::new("/x")).is_err());
        o = opts();
        o.memory = 16;
        assert!(xl_config(&o, Path::new("/x")).is_err());
    }

    #[test]
    fn ldd_finds_glibc_for_a_dynamic_program() {
        let libs = shared_libs(Path::new("/bin/sh")).unwrap();
        assert!(libs.iter().any(|l| l.ends_with("libc.so.6")), "{libs:?}");
        assert!(libs.iter().any(|l| l.ends_with("libgcc_s.so.1")), "glibc's run-time dependency: {libs:?}");
    }
}
