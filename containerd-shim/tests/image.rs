//! The zone image of a container's layers, built with the real `mkfs.erofs` and read back
//! with `fsck.erofs --extract`: whiteouts applied, owners and modes kept, built once per
//! content. Needs root (the merge is an overlay mount; whiteouts are device nodes) and
//! erofs-utils; without them it says why and passes, unless `XENVGPU_REQUIRE_CONTAINERD` is
//! set (CI, after installing them), when it fails.

use containerd_shim_xenvgpu::backend::RootfsMount;
use containerd_shim_xenvgpu::image::ImageCache;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

fn ready() -> bool {
    let have = |c: &str| {
        Command::new("sh").args(["-c", &format!("command -v {c}")]).output().is_ok_and(|o| o.status.success())
    };
    let why = if !nix::unistd::geteuid().is_root() {
        Some("not root")
    } else if !have("mkfs.erofs") || !have("fsck.erofs") {
        Some("no erofs-utils")
    } else {
        None
    };
    let Some(why) = why else { return true };
    assert!(std::env::var_os("XENVGPU_REQUIRE_CONTAINERD").is_none(), "XENVGPU_REQUIRE_CONTAINERD is set but {why}");
    eprintln!("SKIPPED: the image test needs root and erofs-utils: {why}");
    false
}

fn extract(image: &Path, to: &Path) {
    let out = Command::new("fsck.erofs").arg(format!("--extract={}", to.display())).arg(image).output().unwrap();
    assert!(out.status.success(), "fsck.erofs: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn layers_become_one_erofs_image_with_whiteouts_applied_built_once() {
    if !ready() {
        return;
    }
    let base = std::env::temp_dir().join(format!("xenvgpu-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (bottom, top) = (base.join("snapshots/1/fs"), base.join("snapshots/2/fs"));
    std::fs::create_dir_all(bottom.join("usr/lib")).unwrap();
    std::fs::create_dir_all(&top).unwrap();
    std::fs::write(bottom.join("usr/lib/keep.so"), b"kept").unwrap();
    std::fs::write(bottom.join("removed"), b"gone in the top layer").unwrap();
    std::fs::write(bottom.join("tool"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(bottom.join("tool"), std::fs::Permissions::from_mode(0o751)).unwrap();
    std::os::unix::fs::chown(bottom.join("tool"), Some(1000), Some(1001)).unwrap();
    std::fs::write(top.join("added"), b"new").unwrap();
    // An overlay whiteout: a 0:0 character device hides the lower file.
    nix::sys::stat::mknod(&top.join("removed"), nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0)
        .unwrap();

    let cache = ImageCache::new(base.join("cache")).unwrap();
    let mount = RootfsMount {
        fs_type: "overlay".into(),
        source: "overlay".into(),
        options: vec![format!("lowerdir={}:{}", top.display(), bottom.display())],
    };
    let image = cache.image_for(std::slice::from_ref(&mount)).unwrap();
    assert!(image.built && image.bytes > 0);
    let again = cache.image_for(std::slice::from_ref(&mount)).unwrap();
    assert_eq!((again.path.clone(), again.built), (image.path.clone(), false), "the same layers come from the cache");

    let out = base.join("extracted");
    extract(&image.path, &out);
    assert_eq!(std::fs::read(out.join("usr/lib/keep.so")).unwrap(), b"kept");
    assert_eq!(std::fs::read(out.join("added")).unwrap(), b"new");
    assert!(!out.join("removed").exists(), "the whiteout hid the lower file");
    let tool = std::fs::metadata(out.join("tool")).unwrap();
    assert_eq!((tool.mode() & 0o7777, tool.uid(), tool.gid()), (0o751, 1000, 1001));
    // Nothing of the build is left beside the image: no merge mount, no temporary file.
    let left: Vec<String> = std::fs::read_dir(base.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, [format!("{}.erofs", image.key)]);
    assert!(!std::fs::read_to_string("/proc/self/mounts").unwrap().contains(&base.display().to_string()));

    // A single layer (a bind mount) is used as it is.
    let bind =
        RootfsMount { fs_type: "bind".into(), source: bottom.display().to_string(), options: vec!["rbind".into()] };
    let single = cache.image_for(&[bind]).unwrap();
    assert_ne!(single.key, image.key);
    let out1 = base.join("extracted-single");
    extract(&single.path, &out1);
    assert_eq!(std::fs::read(out1.join("removed")).unwrap(), b"gone in the top layer");
    std::fs::remove_dir_all(&base).unwrap();
}
