//! A container's image as one read-only erofs file, for the zone to get as a Xen PV block
//! device: the image's layers never pass through the zone's RAM (a CUDA image is several GB),
//! and the container's writable layer lives inside the zone.
//!
//! The layers come from the snapshotter's mounts (`overlay`: the `lowerdir=` directories, top
//! first; `bind`: one directory). Images are cached in one directory by a key over the
//! layers' identity — each layer directory's path, device, inode, modification and change
//! times. A containerd snapshot directory is immutable once committed, so the same layers give
//! the same key and a changed or different layer a new one. Several layers are merged
//! through a private read-only overlay mount (which applies the layers' whiteouts) before
//! `mkfs.erofs` reads them; the result is written to a temporary file and renamed into place,
//! so a concurrent builder of the same key and a crash mid-build never leave a partial image
//! under the key.

use crate::backend::RootfsMount;
use sha2::{Digest, Sha256};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Why an image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The mounts are of a kind this does not handle.
    #[error("{0}")]
    Unsupported(String),
    /// A layer or the cache could not be read or written.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// What went wrong.
        err: std::io::Error,
    },
    /// `mkfs.erofs` (erofs-utils) failed or is missing.
    #[error("{0}")]
    Mkfs(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |err| ImageError::Io { what, err }
}

/// A built (or cached) image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneImage {
    /// The erofs file.
    pub path: PathBuf,
    /// Its cache key (hex).
    pub key: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// Whether this call built it (false: it was in the cache).
    pub built: bool,
}

/// The image layers of a root filesystem's mounts, top layer first.
pub fn layers(mounts: &[RootfsMount]) -> Result<Vec<PathBuf>, ImageError> {
    let [mount] = mounts else {
        return Err(ImageError::Unsupported(format!("expected one root filesystem mount, got {}", mounts.len())));
    };
    match mount.fs_type.as_str() {
        "overlay" => {
            let lower = mount
                .options
                .iter()
                .find_map(|o| o.strip_prefix("lowerdir="))
                .ok_or_else(|| ImageError::Unsupported("an overlay mount without lowerdir=".into()))?;
            let dirs: Vec<PathBuf> = lower.split(':').filter(|d| !d.is_empty()).map(PathBuf::from).collect();
            if dirs.is_empty() {
                return Err(ImageError::Unsupported("an overlay mount with an empty lowerdir=".into()));
            }
            Ok(dirs)
        }
        "bind" | "rbind" => Ok(vec![PathBuf::from(&mount.source)]),
        other => Err(ImageError::Unsupported(format!("root filesystem mounts of type {other} are not supported"))),
    }
}

/// The cache key of these layers (see the module's documentation).
pub fn key(layers: &[PathBuf]) -> Result<String, ImageError> {
    let mut h = Sha256::new();
    h.update(b"xenvgpu-erofs-v1\0");
    for dir in layers {
        let m = std::fs::metadata(dir).map_err(io(format!("reading layer {}", dir.display())))?;
        if !m.is_dir() {
            return Err(ImageError::Unsupported(format!("layer {} is not a directory", dir.display())));
        }
        h.update(dir.as_os_str().as_encoded_bytes());
        h.update(b"\0");
        for n in [m.dev(), m.ino(), m.mtime() as u64, m.mtime_nsec() as u64, m.ctime() as u64, m.ctime_nsec() as u64] {
            h.update(n.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Images by key in one directory.
pub struct ImageCache {
    dir: PathBuf,
}

impl ImageCache {
    /// A cache in `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io(format!("creating the image cache {}", dir.display())))?;
        Ok(ImageCache { dir })
    }

    /// The erofs image of the root filesystem's image layers: from the cache, or built.
    pub fn image_for(&self, mounts: &[RootfsMount]) -> Result<ZoneImage, ImageError> {
        let layers = layers(mounts)?;
        let key = key(&layers)?;
        let path = self.dir.join(format!("{key}.erofs"));
        if let Ok(m) = std::fs::metadata(&path) {
            return Ok(ZoneImage { path, key, bytes: m.len(), built: false });
        }
        let started = Instant::now();
        log::info!("building the zone image {key} from {} layer(s)", layers.len());
        let tmp = self.dir.join(format!(".{key}.erofs.{}.tmp", std::process::id()));
        let result = match layers.as_slice() {
            [one] => mkfs(&tmp, one),
            several => self.merged(&key, several, |merged| mkfs(&tmp, merged)),
        };
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &path).map_err(io(format!("moving the image into {}", path.display())))?;
        let bytes = std::fs::metadata(&path).map_err(io("reading the built image"))?.len();
        log::info!("built the zone image {key}: {bytes} bytes in {:.1} s", started.elapsed().as_secs_f64());
        Ok(ZoneImage { path, key, bytes, built: true })
    }

    /// Runs `f` on a read-only overlay of `layers` (top first), unmounted afterwards.
    fn merged<T>(
        &self,
        key: &str,
        layers: &[PathBuf],
        f: impl FnOnce(&Path) -> Result<T, ImageError>,
    ) -> Result<T, ImageError> {
        let at = self.dir.join(format!(".{key}.merge.{}", std::process::id()));
        std::fs::create_dir_all(&at).map_err(io(format!("creating {}", at.display())))?;
        let lower: Vec<String> = layers.iter().map(|l| l.display().to_string()).collect();
        let opts = format!("lowerdir={}", lower.join(":"));
        let mounted = nix::mount::mount(
            Some("overlay"),
            &at,
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(opts.as_str()),
        );
        if let Err(e) = mounted {
            let _ = std::fs::remove_dir(&at);
            return Err(ImageError::Io {
                what: format!("merging {} layers with a read-only overlay", layers.len()),
                err: e.into(),
            });
        }
        let out = f(&at);
        let _ = nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&at);
        out
    }
}

/// `mkfs.erofs` of `dir` into `out` (lz4, owners and modes kept).
fn mkfs(out: &Path, dir: &Path) -> Result<(), ImageError> {
    let result = Command::new("mkfs.erofs").arg("-zlz4").arg("--quiet").arg(out).arg(dir).output();
    match result {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(ImageError::Mkfs(format!(
            "mkfs.erofs {} {} failed ({}): {}",
            out.display(),
            dir.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) => Err(ImageError::Mkfs(format!("running mkfs.erofs (Debian: erofs-utils): {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overlay(lower: &str) -> RootfsMount {
        RootfsMount {
            fs_type: "overlay".into(),
            source: "overlay".into(),
            options: vec!["index=off".into(), "workdir=/w".into(), "upperdir=/u".into(), format!("lowerdir={lower}")],
        }
    }

    #[test]
    fn layers_come_from_the_snapshotters_mounts_top_first() {
        assert_eq!(
            layers(&[overlay("/s/3/fs:/s/2/fs:/s/1/fs")]).unwrap(),
            [PathBuf::from("/s/3/fs"), PathBuf::from("/s/2/fs"), PathBuf::from("/s/1/fs")]
        );
        let bind = RootfsMount {
            fs_type: "bind".into(),
            source: "/s/9/fs".into(),
            options: vec!["rbind".into(), "ro".into()],
        };
        assert_eq!(layers(&[bind]).unwrap(), [PathBuf::from("/s/9/fs")]);
        for bad in [
            vec![],
            vec![overlay("/a"), overlay("/b")],
            vec![RootfsMount {
                fs_type: "overlay".into(),
                source: "overlay".into(),
                options: vec!["upperdir=/u".into()],
            }],
            vec![overlay("")],
            vec![RootfsMount { fs_type: "ext4".into(), source: "/dev/x".into(), options: vec![] }],
        ] {
            assert!(matches!(layers(&bad), Err(ImageError::Unsupported(_))), "{bad:?}");
        }
    }

    #[test]
    fn the_key_follows_the_layers_identity() {
        let base = std::env::temp_dir().join(format!("xenvgpu-key-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        let k = key(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(k, key(&[a.clone(), b.clone()]).unwrap(), "stable");
        assert_ne!(k, key(&[b.clone(), a.clone()]).unwrap(), "order matters");
        assert_ne!(k, key(std::slice::from_ref(&a)).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(a.join("new"), b"x").unwrap();
        assert_ne!(k, key(&[a.clone(), b.clone()]).unwrap(), "a changed layer is a new image");
        assert!(matches!(key(&[base.join("missing")]), Err(ImageError::Io { .. })));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
