//! The guest kernel: Linux from a local source tarball (or tree), `make tinyconfig` plus
//! `kernel-config/guest.fragment`, built out of tree in a cache so later builds are
//! incremental.
//!
//! Cache layout (`$XEN_VGPU_CACHE`, default `~/.cache/xen-vgpu`):
//! `kernel/src-<id>/` the unpacked tarball (`<id>` from its name, size and mtime; a
//! `.unpacked` marker is written last, so an interrupted unpack is redone),
//! `kernel/config-<id>/` a scratch tree where the config is generated, and
//! `kernel/build-<id>/` the build tree. A stamp in the build tree records the source and the
//! fragment of the last finished build: when both match, nothing runs. Otherwise the build
//! tree's `.config` is replaced only when the generated one differs, and `make` rebuilds
//! what changed.

use super::progress::Progress;
use super::{cache_dir, need_tool};
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Debian's `linux-source-6.1` package puts its tarball here.
pub const DEBIAN_SOURCE: &str = "/usr/src/linux-source-6.1.tar.xz";

/// Options every guest kernel must have, whatever the fragment says: without them the
/// image cannot boot as a PV domU or talk to host-proxy. Checked on the built config.
pub const REQUIRED: &[&str] = &[
    "CONFIG_XEN_PV",
    "CONFIG_HVC_XEN",
    "CONFIG_XEN_XENBUS_FRONTEND",
    "CONFIG_XEN_DEV_EVTCHN",
    "CONFIG_XEN_GNTDEV",
    "CONFIG_XEN_GRANT_DEV_ALLOC",
    "CONFIG_DEVTMPFS",
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_RD_GZIP",
    "CONFIG_BINFMT_ELF",
    "CONFIG_PROC_FS",
    "CONFIG_SYSFS",
    "CONFIG_TMPFS",
    "CONFIG_FUTEX",
    "CONFIG_UNIX",
];

/// What a kernel build produced.
pub struct Kernel {
    /// The compressed kernel (`arch/x86/boot/bzImage`).
    pub image: PathBuf,
    /// The `.config` it was built with.
    pub config: PathBuf,
}

/// Parses `CONFIG_X=v` and `# CONFIG_X is not set` lines into option → value ("n" for
/// not set). Other lines are ignored.
pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("# ").and_then(|l| l.strip_suffix(" is not set")) {
            if rest.starts_with("CONFIG_") {
                map.insert(rest.to_string(), "n".to_string());
            }
        } else if let Some((k, v)) = line.split_once('=') {
            if k.starts_with("CONFIG_") && !line.starts_with('#') {
                map.insert(k.to_string(), v.to_string());
            }
        }
    }
    map
}

/// Options of `fragment` whose value in `config` differs (Kconfig drops an option whose
/// dependencies are not met; that must fail the build, not go unnoticed).
pub fn unmet(fragment: &BTreeMap<String, String>, config: &BTreeMap<String, String>) -> Vec<String> {
    fragment
        .iter()
        .filter(|(k, want)| {
            let have = config.get(*k).map(String::as_str).unwrap_or("n");
            have != want.as_str()
        })
        .map(|(k, want)| format!("{k}={want} (got {})", config.get(k).map(String::as_str).unwrap_or("not set")))
        .collect()
}

/// Applies `fragment` over `base` (a `.config`'s text): each option of the fragment
/// replaces the base's line for it or is appended.
pub fn merge(base: &str, fragment: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(base.len() + 4096);
    for line in base.lines() {
        let t = line.trim();
        let key = t
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
            .or_else(|| t.split_once('=').map(|(k, _)| k))
            .unwrap_or("");
        if !fragment.contains_key(key) {
            out.push_str(line);
            out.push('\n');
        }
    }
    for (k, v) in fragment {
        if v == "n" {
            out.push_str(&format!("# {k} is not set\n"));
        } else {
            out.push_str(&format!("{k}={v}\n"));
        }
    }
    out
}

/// Finds the kernel source: `given` (a tarball or an unpacked tree) or Debian's package.
pub fn locate_source(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        ensure!(p.exists(), "kernel source {} does not exist", p.display());
        return Ok(p.to_path_buf());
    }
    let debian = Path::new(DEBIAN_SOURCE);
    if debian.exists() {
        return Ok(debian.to_path_buf());
    }
    bail!(
        "no Linux kernel source found: install Debian's package (apt-get install linux-source-6.1, \
         which provides {DEBIAN_SOURCE}) or pass --kernel-source PATH (a tarball or an unpacked tree)"
    )
}

fn source_id(source: &Path) -> Result<String> {
    let meta = std::fs::metadata(source).with_context(|| format!("reading {}", source.display()))?;
    let mtime =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
    let stem: String = source
        .file_name()
        .map(|n| n.to_string_lossy().replace(".tar", "").replace(".xz", "").replace(".gz", ""))
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' })
        .collect();
    let canon = std::fs::canonicalize(source)?;
    let h = super::fnv64(canon.to_string_lossy().as_bytes()) ^ meta.len() ^ mtime;
    Ok(format!("{stem}-{h:016x}"))
}

/// Unpacks a tarball into the cache once; returns the source tree.
fn unpack(source: &Path, id: &str) -> Result<PathBuf> {
    if source.is_dir() {
        ensure!(source.join("Makefile").exists(), "{} is not a kernel source tree", source.display());
        return Ok(source.to_path_buf());
    }
    let dir = cache_dir()?.join("kernel").join(format!("src-{id}"));
    let marker = dir.join(".unpacked");
    if marker.exists() {
        return tree_root(&dir);
    }
    need_tool("tar", "tar")?;
    if source.extension().is_some_and(|e| e == "xz") {
        need_tool("xz", "xz-utils")?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    eprintln!("kernel: unpacking {} (one time, ~15 s)", source.display());
    super::run_quiet(Command::new("tar").arg("-xf").arg(source).arg("-C").arg(&dir), "unpacking the kernel source")?;
    std::fs::write(&marker, b"")?;
    tree_root(&dir)
}

/// The one top-level directory of an unpacked tarball.
fn tree_root(dir: &Path) -> Result<PathBuf> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() && p.join("Makefile").exists() {
            return Ok(p);
        }
    }
    bail!("{} holds no kernel source tree", dir.display())
}

fn make(src: &Path, out: &Path) -> Command {
    let mut c = Command::new("make");
    c.arg("-C").arg(src).arg(format!("O={}", out.display()));
    c
}

/// Builds (or brings up to date) the guest kernel.
pub fn build(source: Option<&Path>, fragment_path: &Path, jobs: usize) -> Result<Kernel> {
    for (tool, pkg) in
        [("make", "make"), ("gcc", "gcc"), ("flex", "flex"), ("bison", "bison"), ("bc", "bc"), ("perl", "perl")]
    {
        need_tool(tool, pkg)?;
    }
    if !Path::new("/usr/include/libelf.h").exists() && !Path::new("/usr/include/gelf.h").exists() {
        bail!("the kernel build needs libelf's headers: install Debian's package libelf-dev");
    }
    let source = locate_source(source)?;
    let id = source_id(&source)?;
    let src = unpack(&source, &id)?;
    let fragment_text =
        std::fs::read_to_string(fragment_path).with_context(|| format!("reading {}", fragment_path.display()))?;
    let fragment = parse_config(&fragment_text);
    ensure!(!fragment.is_empty(), "{} holds no CONFIG_ options", fragment_path.display());
    let kdir = cache_dir()?.join("kernel");
    let build = kdir.join(format!("build-{id}"));
    let image = build.join("arch/x86/boot/bzImage");
    let config = build.join(".config");

    // 0. A finished build of this source with this fragment: nothing to do.
    let stamp_file = build.join(".xen-vgpu-stamp");
    let stamp = format!("{id} {:016x}\n", super::fnv64(fragment_text.as_bytes()));
    if image.exists() && config.exists() && std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str())
    {
        eprintln!("kernel: up to date ({})", image.display());
        return Ok(Kernel { image, config });
    }
    let _ = std::fs::remove_file(&stamp_file);

    // 1. Generate the config in a scratch tree: tinyconfig, the fragment, olddefconfig.
    let scratch = kdir.join(format!("config-{id}"));
    std::fs::create_dir_all(&scratch)?;
    let t = std::time::Instant::now();
    super::run_quiet(make(&src, &scratch).arg("tinyconfig"), "make tinyconfig")?;
    let base = std::fs::read_to_string(scratch.join(".config"))?;
    std::fs::write(scratch.join(".config"), merge(&base, &fragment))?;
    super::run_quiet(make(&src, &scratch).arg("olddefconfig"), "make olddefconfig")?;
    let generated = std::fs::read_to_string(scratch.join(".config"))?;
    let missing = unmet(&fragment, &parse_config(&generated));
    if !missing.is_empty() {
        bail!(
            "these options of {} did not survive `make olddefconfig` (unmet dependencies?):\n  {}",
            fragment_path.display(),
            missing.join("\n  ")
        );
    }
    eprintln!("kernel: config generated and checked ({:.1} s)", t.elapsed().as_secs_f64());

    // 2. Build out of tree, replacing .config only when it changed.
    std::fs::create_dir_all(&build)?;
    if std::fs::read_to_string(&config).ok().as_deref() != Some(generated.as_str()) {
        std::fs::write(&config, &generated)?;
        eprintln!("kernel: new or changed config, building in {}", build.display());
    }
    compile(&src, &build, jobs)?;
    ensure!(image.exists(), "the kernel build finished without {}", image.display());
    std::fs::write(&stamp_file, stamp)?;
    Ok(Kernel { image, config })
}

/// `make bzImage` with a progress line: objects compiled so far against the count the
/// previous full build of this tree needed (stored in the build tree).
fn compile(src: &Path, build: &Path, jobs: usize) -> Result<()> {
    let count_file = build.join(".xen-vgpu-objects");
    let expected: Option<u64> = std::fs::read_to_string(&count_file).ok().and_then(|s| s.trim().parse().ok());
    let mut child = make(src, build)
        .arg(format!("-j{jobs}"))
        .arg("bzImage")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting make")?;
    let stderr = child.stderr.take().context("make stderr")?;
    // Errors and warnings are kept for the report; stderr is drained on its own thread.
    let errors =
        std::thread::spawn(move || -> Vec<String> { BufReader::new(stderr).lines().map_while(Result::ok).collect() });
    let mut progress = Progress::new("kernel: compiling", expected.unwrap_or(0));
    let mut compiled = 0u64;
    for line in BufReader::new(child.stdout.take().context("make stdout")?).lines().map_while(Result::ok) {
        let t = line.trim_start();
        if t.starts_with("CC ") || t.starts_with("AS ") || t.starts_with("LD ") || t.starts_with("AR ") {
            compiled += 1;
            progress.set(compiled, t.split_whitespace().last().unwrap_or(""));
        }
    }
    let status = child.wait()?;
    let err_lines = errors.join().unwrap_or_default();
    progress.finish(compiled);
    if !status.success() {
        let tail: Vec<_> = err_lines.iter().rev().take(40).rev().cloned().collect();
        bail!("the kernel build failed ({status}); last messages:\n{}", tail.join("\n"));
    }
    if expected.is_none() || compiled > expected.unwrap_or(0) {
        std::fs::write(&count_file, compiled.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_replaces_and_appends_and_unmet_reports_dropped_options() {
        let base = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n# comment\n";
        let frag = parse_config("CONFIG_B=y\n# CONFIG_A is not set\nCONFIG_D=64\n");
        let merged = parse_config(&merge(base, &frag));
        assert_eq!(merged["CONFIG_A"], "n");
        assert_eq!(merged["CONFIG_B"], "y");
        assert_eq!(merged["CONFIG_C"], "\"x\"");
        assert_eq!(merged["CONFIG_D"], "64");
        assert!(unmet(&frag, &merged).is_empty());
        // Kconfig dropped CONFIG_B (deps unmet): reported.
        let after = parse_config("# CONFIG_A is not set\nCONFIG_D=64\n");
        assert_eq!(unmet(&frag, &after), vec!["CONFIG_B=y (got not set)".to_string()]);
    }

    #[test]
    fn the_fragment_holds_every_required_option() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../kernel-config/guest.fragment")).unwrap();
        let frag = parse_config(&text);
        for opt in REQUIRED {
            assert_eq!(frag.get(*opt).map(String::as_str), Some("y"), "{opt} missing from the fragment");
        }
    }
}
