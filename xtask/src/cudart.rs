//! `cargo xtask fetch-cudart`: NVIDIA's CUDA runtime (libcudart, shared and static, with
//! its headers) from the PyPI wheels NVIDIA publishes, for the tests that run runtime
//! programs against libvgpu on a machine without a GPU (`libvgpu/tests/cudarc_sim.rs`).
//!
//! The wheels are pinned by version and SHA-256, downloaded once with pip into
//! `~/.cache/xen-vgpu/wheels/` and unpacked into `~/.cache/xen-vgpu/cudart/<version>/`
//! with `include/` (the runtime's headers plus the `crt/` headers they include, which
//! CUDA ships in a separate wheel) and `lib/` (`libcudart.so.N`, `libcudart_static.a`).

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One pinned wheel.
struct Wheel {
    package: &'static str,
    version: &'static str,
    sha256: &'static str,
    /// The folder inside the wheel that holds `include/` and `lib/`.
    root: &'static str,
}

const MANYLINUX: &str = "py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl";

/// A runtime: its wheel, and the wheel whose `crt/` headers its headers include.
struct Runtime {
    runtime: Wheel,
    crt: Wheel,
}

/// The runtimes the tests use: the last CUDA 12 release and the CUDA 13.0 of the GPU
/// machine's toolkit. CUDA 12 wheels ship no `crt/` headers (they come with nvcc), so
/// both take them from 13.0's small `nvidia-cuda-crt` wheel (host-side macros only).
const RUNTIMES: [Runtime; 2] = [
    Runtime {
        runtime: Wheel {
            package: "nvidia-cuda-runtime-cu12",
            version: "12.9.79",
            sha256: "25bba2dfb01d48a9b59ca474a1ac43c6ebf7011f1b0b8cc44f54eb6ac48a96c3",
            root: "nvidia/cuda_runtime",
        },
        crt: CRT_13_0,
    },
    Runtime {
        runtime: Wheel {
            package: "nvidia-cuda-runtime",
            version: "13.0.96",
            sha256: "7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548",
            root: "nvidia/cu13",
        },
        crt: CRT_13_0,
    },
];

const CRT_13_0: Wheel = Wheel {
    package: "nvidia-cuda-crt",
    version: "13.0.88",
    sha256: "2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4",
    root: "nvidia/cu13",
};

impl Wheel {
    fn file_name(&self) -> String {
        format!("{}-{}-{MANYLINUX}", self.package.replace('-', "_"), self.version)
    }
}

/// Downloads (once) and unpacks every pinned runtime; returns the folder holding one
/// `<version>/` folder per runtime.
pub fn fetch() -> Result<PathBuf> {
    let cache = crate::image::cache_dir()?;
    let wheels = cache.join("wheels");
    let out = cache.join("cudart");
    std::fs::create_dir_all(&wheels).with_context(|| format!("creating {}", wheels.display()))?;
    for rt in &RUNTIMES {
        let dest = out.join(rt.runtime.version);
        let stamp = dest.join(".complete");
        if stamp.exists() {
            continue;
        }
        let runtime = download(&wheels, &rt.runtime)?;
        let crt = download(&wheels, &rt.crt)?;
        let scratch = out.join(format!(".{}.partial", rt.runtime.version));
        let _ = std::fs::remove_dir_all(&scratch);
        unzip(&runtime, &scratch.join("runtime"))?;
        unzip(&crt, &scratch.join("crt"))?;
        let _ = std::fs::remove_dir_all(&dest);
        std::fs::create_dir_all(&dest)?;
        let rroot = scratch.join("runtime").join(rt.runtime.root);
        std::fs::rename(rroot.join("lib"), dest.join("lib")).context("moving the runtime's lib/")?;
        std::fs::rename(rroot.join("include"), dest.join("include")).context("moving the runtime's include/")?;
        let crt_dir = scratch.join("crt").join(rt.crt.root).join("include/crt");
        ensure!(crt_dir.join("host_defines.h").exists(), "{} has no include/crt/host_defines.h", rt.crt.file_name());
        if !dest.join("include/crt").exists() {
            std::fs::rename(&crt_dir, dest.join("include/crt")).context("moving crt/ headers")?;
        }
        ensure!(
            dest.join("lib/libcudart_static.a").exists(),
            "{} has no lib/libcudart_static.a",
            rt.runtime.file_name()
        );
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::write(&stamp, rt.runtime.file_name())?;
        eprintln!("fetch-cudart: {} {} unpacked into {}", rt.runtime.package, rt.runtime.version, dest.display());
    }
    Ok(out)
}

/// The wheel's file in `dir`, downloaded with pip when missing; its hash checked.
fn download(dir: &Path, w: &Wheel) -> Result<PathBuf> {
    let file = dir.join(w.file_name());
    if !file.exists() {
        eprintln!("fetch-cudart: downloading {}=={} from PyPI", w.package, w.version);
        ensure_pip()?;
        let python = if crate::image::which("python3").is_some() { "python3" } else { "python" };
        let status = Command::new(python)
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest"])
            .arg(dir)
            .arg(format!("{}=={}", w.package, w.version))
            .status()
            .with_context(|| format!("running {python} -m pip (install python3-pip)"))?;
        ensure!(status.success(), "pip could not download {}=={} (network? PyPI?)", w.package, w.version);
        ensure!(file.exists(), "pip downloaded {}=={}, but not as {}", w.package, w.version, file.display());
    }
    let got = sha256(&file)?;
    if !w.sha256.is_empty() && got != w.sha256 {
        let _ = std::fs::remove_file(&file);
        bail!("{}: SHA-256 {got}, expected {} (removed; run again to re-download)", file.display(), w.sha256);
    }
    Ok(file)
}

/// pip, from Debian's packages when it is missing (a fresh Debian 12 has python3 only).
fn ensure_pip() -> Result<()> {
    crate::apt_install(&crate::missing_packages(&[("python3", "python3")]))?;
    let has_pip = Command::new("python3").args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
    if !has_pip {
        crate::apt_install(&["python3-pip"])?;
    }
    Ok(())
}

fn sha256(file: &Path) -> Result<String> {
    let out = Command::new("sha256sum").arg(file).output().context("running sha256sum (coreutils)")?;
    ensure!(out.status.success(), "sha256sum {} failed", file.display());
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.split_whitespace().next().unwrap_or_default().to_owned())
}

/// Unpacks a wheel (a zip file) with Python's zipfile module (no unzip needed).
fn unzip(wheel: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    let python = if crate::image::which("python3").is_some() { "python3" } else { "python" };
    let status =
        Command::new(python).args(["-m", "zipfile", "-e"]).arg(wheel).arg(dest).status().context("running python3")?;
    ensure!(status.success(), "could not unpack {}", wheel.display());
    Ok(())
}
