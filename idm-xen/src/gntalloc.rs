//! `/dev/xen/gntalloc`: a guest allocates pages and grants another domain access to them.
//!
//! `IOCTL_GNTALLOC_ALLOC_GREF` allocates zeroed pages, grants them to `domid` and returns
//! one grant reference per page plus a file offset; `mmap` at that offset maps the pages
//! here. The grants live until both the mapping is gone and `IOCTL_GNTALLOC_DEALLOC_GREF`
//! was issued; [`GrantedPages`] does both on drop. Layouts follow
//! `linux/include/uapi/xen/gntalloc.h`.

use crate::error::XenError;
use crate::sys::{self, ioc_none, XEN_PAGE_SIZE};
use idm_core::RawRegion;
use std::fs::File;
use std::mem::size_of;
use std::ptr::NonNull;
use std::sync::Arc;

/// Most pages one [`GntAlloc::alloc`] grants (256 MiB); the module's own limit
/// (`xen_gntalloc.limit`, default 1024 pages in all) is usually lower.
pub const MAX_GRANT_PAGES: usize = 65536;

/// `struct ioctl_gntalloc_alloc_gref` up to its variable tail `gref_ids[]`.
#[repr(C)]
struct AllocGrefHead {
    domid: u16,
    flags: u16,
    count: u32,
    index: u64,
}
/// `sizeof(struct ioctl_gntalloc_alloc_gref)`: the head plus `gref_ids[1]`, padded to 8.
const ALLOC_GREF_SIZE: usize = 24;
const _: () = assert!(size_of::<AllocGrefHead>() == 16);

#[repr(C)]
struct DeallocGref {
    index: u64,
    count: u32,
}
#[repr(C)]
pub(crate) struct UnmapNotify {
    pub(crate) index: u64,
    pub(crate) action: u32,
    pub(crate) event_channel_port: u32,
}
const _: () = assert!(size_of::<DeallocGref>() == 16);
const _: () = assert!(size_of::<UnmapNotify>() == 16);

const IOCTL_GNTALLOC_ALLOC_GREF: u32 = ioc_none(b'G', 5, ALLOC_GREF_SIZE);
const IOCTL_GNTALLOC_DEALLOC_GREF: u32 = ioc_none(b'G', 6, size_of::<DeallocGref>());
const IOCTL_GNTALLOC_SET_UNMAP_NOTIFY: u32 = ioc_none(b'G', 7, size_of::<UnmapNotify>());
const GNTALLOC_FLAG_WRITABLE: u16 = 1;
/// Unmap-notify action: clear the byte at the given offset (shared with gntdev).
pub(crate) const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 1;
/// Unmap-notify action: signal the given event channel (shared with gntdev).
pub(crate) const UNMAP_NOTIFY_SEND_EVENT: u32 = 2;

/// An open `/dev/xen/gntalloc`.
#[derive(Debug)]
pub struct GntAlloc {
    file: Arc<File>,
}

impl GntAlloc {
    /// Path of the device.
    pub const PATH: &'static str = "/dev/xen/gntalloc";

    /// Opens the device (in a Xen guest with the `xen_gntalloc` driver).
    pub fn open() -> Result<Self, XenError> {
        sys::check_page_size()?;
        Ok(GntAlloc { file: Arc::new(sys::open_device(Self::PATH, false)?) })
    }

    /// Allocates `count` zeroed pages, grants them to `domid` (read-write if `writable`)
    /// and maps them here read-write.
    pub fn alloc(&self, domid: u16, count: usize, writable: bool) -> Result<GrantedPages, XenError> {
        if count == 0 || count > MAX_GRANT_PAGES {
            return Err(XenError::InvalidArgument("gntalloc page count must be 1..=MAX_GRANT_PAGES"));
        }
        // The kernel copies the fixed struct (24 bytes) in and out, and writes `count` grant
        // references from byte 16; u64 words keep the buffer aligned for the u64 index.
        let bytes = ALLOC_GREF_SIZE.max(16 + 4 * count);
        let mut buf = vec![0u64; bytes.div_ceil(8)];
        let flags = if writable { GNTALLOC_FLAG_WRITABLE } else { 0 };
        let mut head = [0u8; 8];
        head[0..2].copy_from_slice(&domid.to_ne_bytes());
        head[2..4].copy_from_slice(&flags.to_ne_bytes());
        head[4..8].copy_from_slice(&(count as u32).to_ne_bytes());
        buf[0] = u64::from_ne_bytes(head);
        // SAFETY: `buf` is `bytes` long: at least the 24-byte struct the request number
        // encodes and the 16 + 4 * count bytes the kernel writes grant references into.
        let rc = unsafe {
            sys::ioctl(&self.file, IOCTL_GNTALLOC_ALLOC_GREF, buf.as_mut_ptr().cast(), "IOCTL_GNTALLOC_ALLOC_GREF")
        };
        if let Err(e) = rc {
            return Err(match e {
                XenError::Os { source, .. } if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::ENOMEM)) => {
                    XenError::GrantLimit { count, source }
                }
                e => e,
            });
        }
        let index = buf[1];
        let refs: Vec<u32> = (0..count)
            .map(|k| {
                let w = buf[2 + k / 2].to_ne_bytes();
                let h = (k % 2) * 4;
                u32::from_ne_bytes([w[h], w[h + 1], w[h + 2], w[h + 3]])
            })
            .collect();
        let len = count * XEN_PAGE_SIZE;
        // We always map read-write: the pages are ours; `writable` only limits the peer.
        let ptr = match sys::mmap_shared(&self.file, len, index, true) {
            Ok(p) => p,
            Err(source) => {
                dealloc(&self.file, index, count);
                return Err(XenError::Os { op: "mmap of granted pages (gntalloc)", source });
            }
        };
        // SAFETY: `ptr` is a fresh page-aligned read-write mapping of `len` bytes that
        // stays mapped until `GrantedPages::drop`, which runs after this region (a field of
        // it) can no longer be used; all access goes through `RawRegion`'s atomics.
        let raw = unsafe { RawRegion::new(ptr, len) };
        Ok(GrantedPages { file: Arc::clone(&self.file), index, refs, raw })
    }
}

fn dealloc(file: &File, index: u64, count: usize) {
    let mut op = DeallocGref { index, count: count as u32 };
    // SAFETY: `op` is the struct the request number encodes, alive for the call.
    let rc =
        unsafe { sys::ioctl(file, IOCTL_GNTALLOC_DEALLOC_GREF, (&raw mut op).cast(), "IOCTL_GNTALLOC_DEALLOC_GREF") };
    debug_assert!(rc.is_ok(), "dealloc of our own grants failed: {rc:?}");
}

/// Pages granted to another domain and mapped here; ungranted and unmapped on drop.
///
/// The peer may write them at any time: access goes through [`GrantedPages::region`]
/// (atomics), never through references.
#[derive(Debug)]
pub struct GrantedPages {
    file: Arc<File>,
    index: u64,
    refs: Vec<u32>,
    raw: RawRegion,
}

impl GrantedPages {
    /// The grant references, one per page, to publish to the peer (e.g. in xenstore).
    pub fn refs(&self) -> &[u32] {
        &self.refs
    }

    /// The base address of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.raw.as_ptr()
    }

    /// Length of the mapping in bytes (pages × 4096).
    pub fn len(&self) -> usize {
        idm_core::SharedMemory::size(&self.raw)
    }

    /// Always false: a grant covers at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The mapping as an `idm_core` region.
    pub fn region(&self) -> &RawRegion {
        &self.raw
    }

    /// Asks the kernel, when these grants are finally released (for instance because this
    /// process died), to clear the byte at `offset` and, with `port`, to signal that event
    /// channel, so the peer learns that we are gone.
    pub fn set_unmap_notify(&self, offset: usize, port: Option<u32>) -> Result<(), XenError> {
        if offset >= self.len() {
            return Err(XenError::InvalidArgument("unmap-notify offset outside the granted pages"));
        }
        let mut op = UnmapNotify {
            index: self.index + offset as u64,
            action: UNMAP_NOTIFY_CLEAR_BYTE | if port.is_some() { UNMAP_NOTIFY_SEND_EVENT } else { 0 },
            event_channel_port: port.unwrap_or(0),
        };
        // SAFETY: `op` is the struct the request number encodes, alive for the call.
        unsafe {
            sys::ioctl(
                &self.file,
                IOCTL_GNTALLOC_SET_UNMAP_NOTIFY,
                (&raw mut op).cast(),
                "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY",
            )
        }?;
        Ok(())
    }
}

impl Drop for GrantedPages {
    fn drop(&mut self) {
        let ptr = NonNull::new(self.raw.as_ptr()).expect("mapping base is non-null");
        // SAFETY: this is the whole mapping made in `alloc`; `self.raw` is its only user
        // and is dropped with `self`, so nothing accesses it afterwards.
        unsafe { sys::munmap(ptr, self.len()) };
        dealloc(&self.file, self.index, self.refs.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_header() {
        assert_eq!(IOCTL_GNTALLOC_ALLOC_GREF, 0x0018_4705);
        assert_eq!(IOCTL_GNTALLOC_DEALLOC_GREF, 0x0010_4706);
        assert_eq!(IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, 0x0010_4707);
    }

    #[test]
    fn open_without_xen_names_the_device() {
        if std::path::Path::new(GntAlloc::PATH).exists() {
            return; // On a Xen guest the device is there; nothing to check.
        }
        let msg = GntAlloc::open().unwrap_err().to_string();
        assert!(msg.contains(GntAlloc::PATH) && msg.contains("is this a Xen domain?"), "{msg}");
    }

    #[test]
    fn grant_limit_error_mentions_both_limits() {
        let e = XenError::GrantLimit { count: 2048, source: std::io::Error::from_raw_os_error(libc::ENOSPC) };
        let text = e.to_string();
        assert!(text.contains("xen_gntalloc.limit") && text.contains("max_grant_frames"), "{text}");
    }
}
