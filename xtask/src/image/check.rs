//! The checks every built image passes (run at the end of each build and in CI): the
//! initramfs holds `/init` as a static executable and libvgpu as `libcuda.so.1`, every
//! dynamic executable finds its loader and libraries inside the image, the kernel config
//! has the required options, the xl config has the required keys, the sizes are in bounds.

use super::cpio::{Node, Tree};
use super::{kernel, mb, LIBCUDA_DIR, MAX_IMAGE_BYTES};
use anyhow::{bail, ensure, Context, Result};
use object::elf;
use object::read::elf::{Dyn, ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object, ObjectSymbol};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// Directories glibc's loader searches without an `ld.so.cache` (Debian's build).
const SEARCH_DIRS: &[&str] = &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib"];
/// Keys `xl create` of a PV guest needs from us.
const XL_KEYS: &[&str] =
    &["name", "type", "kernel", "ramdisk", "extra", "memory", "vcpus", "max_grant_frames", "on_poweroff", "on_crash"];

/// What the loader needs for one ELF: its interpreter and `DT_NEEDED` names, its SONAME.
#[derive(Debug, Default)]
pub struct ElfDeps {
    /// `PT_INTERP`, if dynamic.
    pub interp: Option<String>,
    /// `DT_NEEDED` entries.
    pub needed: Vec<String>,
    /// `DT_SONAME`.
    pub soname: Option<String>,
}

/// Reads the dynamic-linking facts of a 64-bit ELF; `None` if `data` is not ELF.
pub fn elf_deps(data: &[u8]) -> Result<Option<ElfDeps>> {
    if !data.starts_with(b"\x7fELF") {
        return Ok(None);
    }
    let file = ElfFile64::<Endianness>::parse(data).context("malformed ELF")?;
    let endian = file.endian();
    let header = file.elf_header();
    let mut deps = ElfDeps::default();
    for ph in header.program_headers(endian, data).context("ELF program headers")? {
        if ph.p_type(endian) == elf::PT_INTERP {
            let bytes = ph.data(endian, data).map_err(|()| anyhow::anyhow!("bad PT_INTERP"))?;
            deps.interp = Some(String::from_utf8_lossy(bytes).trim_end_matches('\0').to_string());
        }
    }
    let sections = file.elf_section_table();
    if let Some((dynamic, link)) = sections.dynamic(endian, data).context("ELF .dynamic")? {
        let strings = sections.strings(endian, data, link).context("ELF .dynstr")?;
        for d in dynamic {
            let tag = d.d_tag(endian) as u32;
            if tag != elf::DT_NEEDED && tag != elf::DT_SONAME {
                continue;
            }
            let s = d.string(endian, strings).map_err(|_| anyhow::anyhow!("bad dynamic string"))?;
            let s = String::from_utf8_lossy(s).to_string();
            if tag == elf::DT_NEEDED {
                deps.needed.push(s);
            } else {
                deps.soname = Some(s);
            }
        }
    }
    Ok(Some(deps))
}

/// Follows symlinks inside the tree (bounded) to a regular file.
fn resolve<'a>(tree: &'a Tree, path: &str) -> Option<&'a [u8]> {
    let mut p = path.trim_start_matches('/').to_string();
    for _ in 0..16 {
        match tree.get(&p)? {
            Node::File { data, .. } => return Some(data),
            Node::Symlink { target } => {
                p = if let Some(abs) = target.strip_prefix('/') {
                    abs.to_string()
                } else {
                    let parent = Path::new(&p).parent().map(|d| d.to_string_lossy().to_string()).unwrap_or_default();
                    if parent.is_empty() {
                        target.clone()
                    } else {
                        format!("{parent}/{target}")
                    }
                };
            }
            _ => return None,
        }
    }
    None
}

/// Checks the rootfs tree.
pub fn check_rootfs(tree: &Tree) -> Result<()> {
    // /init: a static executable (the kernel runs it before any loader could be found).
    let Some(Node::File { mode, data }) = tree.get("init") else { bail!("the initramfs has no /init file") };
    ensure!(mode & 0o111 != 0, "/init is not executable");
    let deps = elf_deps(data)?.context("/init is not an ELF executable")?;
    ensure!(
        deps.interp.is_none() && deps.needed.is_empty(),
        "/init is not static: interpreter {:?}, needs {:?}",
        deps.interp,
        deps.needed
    );

    // libvgpu as libcuda.so.1, with the SONAME applications link against and the symlink.
    let lib = format!("{LIBCUDA_DIR}/libcuda.so.1");
    let Some(Node::File { data, .. }) = tree.get(&lib) else { bail!("the initramfs has no {lib}") };
    let deps = elf_deps(data)?.context("libcuda.so.1 is not ELF")?;
    ensure!(deps.soname.as_deref() == Some("libcuda.so.1"), "libcuda.so.1 has SONAME {:?}", deps.soname);
    let file = object::File::parse(data.as_slice()).context("libcuda.so.1")?;
    ensure!(
        file.dynamic_symbols().any(|s| s.name() == Ok("cuInit") && s.is_definition()),
        "libcuda.so.1 does not export cuInit"
    );
    ensure!(
        resolve(tree, &format!("{LIBCUDA_DIR}/libcuda.so")).is_some(),
        "{LIBCUDA_DIR}/libcuda.so does not lead to libcuda.so.1"
    );
    ensure!(
        matches!(tree.get("dev/console"), Some(Node::CharDev { major: 5, minor: 1, .. })),
        "/dev/console (5,1) is missing: PID 1 would start without a console"
    );

    // Every dynamic ELF finds its loader and its libraries inside the image. The loader
    // itself satisfies a DT_NEEDED of its own name (it is loaded before any search).
    let mut loaders = Vec::new();
    for (_, node) in tree.iter() {
        if let Node::File { data, .. } = node {
            if let Some(ElfDeps { interp: Some(i), .. }) = elf_deps(data)? {
                if resolve(tree, &i).is_some() {
                    loaders
                        .push(Path::new(&i).file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default());
                }
            }
        }
    }
    for (path, node) in tree.iter() {
        let Node::File { data, .. } = node else { continue };
        let Some(deps) = elf_deps(data).with_context(|| format!("/{path}"))? else { continue };
        if let Some(interp) = &deps.interp {
            ensure!(resolve(tree, interp).is_some(), "/{path} needs the loader {interp}, which is not in the image");
        }
        for needed in &deps.needed {
            let found = loaders.contains(needed)
                || SEARCH_DIRS.iter().any(|d| resolve(tree, &format!("{d}/{needed}")).is_some());
            ensure!(found, "/{path} needs {needed}, which is not in the image");
        }
    }
    Ok(())
}

/// Checks a kernel `.config` for the options every guest kernel needs.
pub fn check_kernel_config(text: &str) -> Result<()> {
    let config = kernel::parse_config(text);
    let missing: Vec<_> =
        kernel::REQUIRED.iter().filter(|o| config.get(**o).map(String::as_str) != Some("y")).collect();
    ensure!(missing.is_empty(), "the kernel config lacks {missing:?}");
    Ok(())
}

/// Parses the `key = value` lines of an xl config (values unquoted).
pub fn parse_xl(text: &str) -> Result<BTreeMap<String, String>> {
    let mut keys = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').with_context(|| format!("xl config line {}: no '='", n + 1))?;
        let v = v.trim();
        let unquoted = match (v.chars().next(), v.chars().last()) {
            (Some(q @ ('\'' | '"')), Some(e)) if e == q && v.len() >= 2 => &v[1..v.len() - 1],
            _ => {
                ensure!(
                    v.parse::<i64>().is_ok(),
                    "xl config line {}: value {v:?} is neither quoted nor a number",
                    n + 1
                );
                v
            }
        };
        ensure!(keys.insert(k.trim().to_string(), unquoted.to_string()).is_none(), "xl config key {} twice", k.trim());
    }
    Ok(keys)
}

/// Checks an xl config for the keys and values a PV guest of ours needs.
pub fn check_xl(text: &str, name: &str) -> Result<()> {
    let keys = parse_xl(text)?;
    for k in XL_KEYS {
        ensure!(keys.contains_key(*k), "the xl config has no `{k}`");
    }
    ensure!(keys["name"] == name, "xl config name is {:?}, not {name:?}", keys["name"]);
    ensure!(keys["type"] == "pv", "xl config type is {:?}, not pv", keys["type"]);
    ensure!(
        keys["kernel"].ends_with("/vmlinuz") && keys["ramdisk"].ends_with("/initramfs.cpio.gz"),
        "xl config kernel/ramdisk paths"
    );
    ensure!(
        keys["extra"].split_whitespace().any(|a| a == "console=hvc0"),
        "the kernel command line lacks console=hvc0"
    );
    for k in ["memory", "vcpus", "max_grant_frames"] {
        ensure!(keys[k].parse::<u32>().is_ok_and(|v| v > 0), "xl config {k} = {:?}", keys[k]);
    }
    Ok(())
}

/// Checks a built image folder.
pub fn check_image(dir: &Path, name: &str) -> Result<()> {
    let gz = std::fs::read(dir.join("initramfs.cpio.gz")).context("reading initramfs.cpio.gz")?;
    let mut cpio = Vec::new();
    flate2::read::GzDecoder::new(gz.as_slice()).read_to_end(&mut cpio).context("initramfs is not gzip")?;
    check_rootfs(&Tree::from_cpio(&cpio)?)?;
    check_kernel_config(&std::fs::read_to_string(dir.join("kernel.config")).context("reading kernel.config")?)?;
    check_xl(&std::fs::read_to_string(dir.join(format!("{name}.cfg"))).context("reading the xl config")?, name)?;
    let kernel = std::fs::read(dir.join("vmlinuz")).context("reading vmlinuz")?;
    ensure!(kernel.len() > 0x300 && &kernel[0x202..0x206] == b"HdrS", "vmlinuz is not a bzImage");
    let total = kernel.len() as u64 + gz.len() as u64;
    ensure!(total <= MAX_IMAGE_BYTES, "the image is {}, over the {} limit", mb(total), mb(MAX_IMAGE_BYTES));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(data: Vec<u8>) -> Node {
        Node::File { mode: 0o755, data }
    }

    #[test]
    fn a_dynamic_init_and_missing_libraries_are_refused() {
        let sh = std::fs::read("/bin/sh").unwrap();
        let deps = elf_deps(&sh).unwrap().unwrap();
        assert!(deps.interp.is_some() && !deps.needed.is_empty());
        let mut t = Tree::default();
        t.insert("/init", file(sh)).unwrap();
        let err = check_rootfs(&t).unwrap_err().to_string();
        assert!(err.contains("/init is not static"), "{err}");
    }

    #[test]
    fn a_tree_without_init_or_libcuda_is_refused() {
        let t = Tree::default();
        assert!(check_rootfs(&t).unwrap_err().to_string().contains("no /init"));
        assert!(elf_deps(b"#!/bin/sh\n").unwrap().is_none());
    }

    #[test]
    fn library_resolution_follows_symlinks_inside_the_tree() {
        let mut t = Tree::default();
        t.insert("/usr/lib/x86_64-linux-gnu/libfoo.so.1", file(vec![1])).unwrap();
        t.insert("/usr/lib/x86_64-linux-gnu/libfoo.so", Node::Symlink { target: "libfoo.so.1".into() }).unwrap();
        t.insert("/lib64/ld.so", Node::Symlink { target: "/usr/lib/x86_64-linux-gnu/libfoo.so".into() }).unwrap();
        t.insert("/loop", Node::Symlink { target: "/loop".into() }).unwrap();
        assert!(resolve(&t, "/lib64/ld.so").is_some());
        assert!(resolve(&t, "/loop").is_none(), "symlink loops end");
        assert!(resolve(&t, "/usr/lib/missing").is_none());
    }

    #[test]
    fn kernel_config_and_xl_checks_name_what_is_missing() {
        let err = check_kernel_config("CONFIG_XEN_PV=y\n").unwrap_err().to_string();
        assert!(err.contains("CONFIG_HVC_XEN"), "{err}");
        let good = "name = 'g'\ntype = 'pv'\nkernel = '/b/vmlinuz'\nramdisk = '/b/initramfs.cpio.gz'\nextra = 'console=hvc0'\nmemory = 256\nvcpus = 1\nmax_grant_frames = 35\non_poweroff = 'destroy'\non_crash = 'destroy'\n";
        check_xl(good, "g").unwrap();
        let err = check_xl(&good.replace("vcpus = 1\n", ""), "g").unwrap_err().to_string();
        assert!(err.contains("vcpus"), "{err}");
        assert!(check_xl(&good.replace("'pv'", "'hvm'"), "g").is_err());
        assert!(check_xl(&good.replace("256", "lots"), "g").is_err());
        assert!(check_xl(&format!("{good}memory = 3\n"), "g").is_err(), "duplicate key");
    }
}
