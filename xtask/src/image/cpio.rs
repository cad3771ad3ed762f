//! The initramfs archive: the `newc` cpio format the kernel unpacks, written from an
//! in-memory tree (no staging directory, no root needed for device nodes), and read back
//! for the image checks.
//!
//! Output is deterministic: entries sorted by path, mtime 0, uid/gid 0, inode numbers in
//! order. The same inputs give the same bytes, so a rebuilt image is comparable.

use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::io::Write;

/// One entry of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// A directory.
    Dir { mode: u32 },
    /// A regular file with its contents.
    File { mode: u32, data: Vec<u8> },
    /// A symbolic link to `target`.
    Symlink { target: String },
    /// A character device node.
    CharDev { mode: u32, major: u32, minor: u32 },
}

/// A file tree keyed by absolute path without the leading slash (`usr/bin/app`).
/// Parent directories are added on insertion, so the archive always unpacks.
#[derive(Default, Debug)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const TRAILER: &str = "TRAILER!!!";

fn normalize(path: &str) -> Result<String> {
    let p = path.trim_start_matches('/');
    ensure!(!p.is_empty(), "empty path in image");
    for part in p.split('/') {
        ensure!(!part.is_empty() && part != "." && part != "..", "path {path:?} is not a plain absolute path");
    }
    Ok(p.to_string())
}

impl Tree {
    /// Inserts `node` at `path`, creating parent directories (mode 0755). Inserting over an
    /// existing different entry is an error (two inputs claiming one path).
    pub fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        let p = normalize(path)?;
        let mut parent = String::new();
        for part in p.split('/').collect::<Vec<_>>().split_last().map(|(_, dirs)| dirs).unwrap_or(&[]) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            match self.nodes.get(&parent) {
                None => {
                    self.nodes.insert(parent.clone(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(_) => bail!("/{parent} is not a directory but /{p} needs it to be one"),
            }
        }
        match self.nodes.get(&p) {
            Some(existing) if existing == &node => Ok(()),
            Some(Node::Dir { .. }) if matches!(node, Node::Dir { .. }) => {
                self.nodes.insert(p, node);
                Ok(())
            }
            Some(_) => bail!("/{p} would be added twice with different contents"),
            None => {
                self.nodes.insert(p, node);
                Ok(())
            }
        }
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path.trim_start_matches('/'))
    }

    /// All entries, sorted by path.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Node)> {
        self.nodes.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Sum of regular file sizes.
    pub fn file_bytes(&self) -> u64 {
        self.nodes.values().map(|n| if let Node::File { data, .. } = n { data.len() as u64 } else { 0 }).sum()
    }

    /// The tree as a `newc` cpio archive.
    pub fn to_cpio(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.file_bytes() as usize + self.nodes.len() * 160);
        for (ino, (path, node)) in self.nodes.iter().enumerate() {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (S_IFDIR | mode, &[], (0, 0)),
                Node::File { mode, data } => (S_IFREG | mode, data, (0, 0)),
                Node::Symlink { target } => (S_IFLNK | 0o777, target.as_bytes(), (0, 0)),
                Node::CharDev { mode, major, minor } => (S_IFCHR | mode, &[], (*major, *minor)),
            };
            let nlink = if matches!(node, Node::Dir { .. }) { 2 } else { 1 };
            write_entry(&mut out, ino as u32 + 1, mode, nlink, rdev, path, data)?;
        }
        write_entry(&mut out, 0, 0, 1, (0, 0), TRAILER, &[])?;
        Ok(out)
    }

    /// Parses a `newc` archive (the checks read back what was written).
    pub fn from_cpio(mut bytes: &[u8]) -> Result<Tree> {
        let mut tree = Tree::default();
        loop {
            ensure!(bytes.len() >= 110, "cpio archive ends inside a header");
            ensure!(&bytes[..6] == b"070701", "not a newc cpio header");
            let field = |i: usize| -> Result<u32> {
                let s = std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).context("cpio header is not ASCII")?;
                u32::from_str_radix(s, 16).with_context(|| format!("bad cpio header field {s:?}"))
            };
            let (mode, filesize, rmajor, rminor, namesize) = (field(1)?, field(6)?, field(9)?, field(10)?, field(11)?);
            let name_end = 110 + namesize as usize;
            ensure!(namesize >= 1 && bytes.len() >= name_end, "cpio name runs past the end");
            let name = std::str::from_utf8(&bytes[110..name_end - 1]).context("cpio name is not UTF-8")?.to_string();
            let data_start = pad4(name_end);
            let data_end = data_start + filesize as usize;
            ensure!(bytes.len() >= data_end, "cpio data of {name} runs past the end");
            let data = &bytes[data_start..data_end];
            if name == TRAILER {
                return Ok(tree);
            }
            let perm = mode & 0o7777;
            let node = match mode & 0o170000 {
                S_IFDIR => Node::Dir { mode: perm },
                S_IFREG => Node::File { mode: perm, data: data.to_vec() },
                S_IFLNK => Node::Symlink { target: String::from_utf8(data.to_vec()).context("symlink target")? },
                S_IFCHR => Node::CharDev { mode: perm, major: rmajor, minor: rminor },
                other => bail!("unexpected file type {other:o} for {name}"),
            };
            tree.nodes.insert(name, node);
            bytes = &bytes[pad4(data_end).min(bytes.len())..];
        }
    }
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) -> Result<()> {
    let size = u32::try_from(data.len()).context("file too large for cpio")?;
    let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
    write!(out, "070701")?;
    for f in fields {
        write!(out, "{f:08x}")?;
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(pad4(out.len()), 0);
    out.extend_from_slice(data);
    out.resize(pad4(out.len()), 0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_kind_of_entry() {
        let mut t = Tree::default();
        t.insert("/init", Node::File { mode: 0o755, data: b"\x7fELF...".to_vec() }).unwrap();
        t.insert("/usr/lib/x86_64-linux-gnu/libcuda.so.1", Node::File { mode: 0o644, data: vec![7; 1001] }).unwrap();
        t.insert("/usr/lib/x86_64-linux-gnu/libcuda.so", Node::Symlink { target: "libcuda.so.1".into() }).unwrap();
        t.insert("/dev/console", Node::CharDev { mode: 0o600, major: 5, minor: 1 }).unwrap();
        let back = Tree::from_cpio(&t.to_cpio().unwrap()).unwrap();
        assert_eq!(back.nodes, t.nodes);
        assert_eq!(back.get("usr/lib"), Some(&Node::Dir { mode: 0o755 }), "parents are created");
    }

    #[test]
    fn output_is_deterministic_and_aligned() {
        let mut a = Tree::default();
        let mut b = Tree::default();
        a.insert("/b", Node::File { mode: 0o644, data: vec![1, 2, 3] }).unwrap();
        a.insert("/a", Node::File { mode: 0o644, data: vec![4] }).unwrap();
        b.insert("/a", Node::File { mode: 0o644, data: vec![4] }).unwrap();
        b.insert("/b", Node::File { mode: 0o644, data: vec![1, 2, 3] }).unwrap();
        let bytes = a.to_cpio().unwrap();
        assert_eq!(bytes, b.to_cpio().unwrap());
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.windows(10).any(|w| w == TRAILER.as_bytes()));
    }

    #[test]
    fn conflicting_and_unsafe_paths_are_refused() {
        let mut t = Tree::default();
        t.insert("/x", Node::File { mode: 0o644, data: vec![1] }).unwrap();
        assert!(t.insert("/x", Node::File { mode: 0o644, data: vec![2] }).is_err());
        assert!(t.insert("/x/y", Node::Dir { mode: 0o755 }).is_err(), "a file cannot become a parent");
        assert!(t.insert("/a/../etc", Node::Dir { mode: 0o755 }).is_err());
        assert!(t.insert("/", Node::Dir { mode: 0o755 }).is_err());
        // The same entry twice is fine (two apps needing one library).
        t.insert("/x", Node::File { mode: 0o644, data: vec![1] }).unwrap();
    }

    #[test]
    fn truncated_archives_are_errors_not_panics() {
        let mut t = Tree::default();
        t.insert("/f", Node::File { mode: 0o644, data: vec![9; 300] }).unwrap();
        let bytes = t.to_cpio().unwrap();
        for cut in [0, 5, 109, 120, 200, bytes.len() - 4] {
            assert!(Tree::from_cpio(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
