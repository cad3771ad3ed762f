//! `/dev/xen/gntdev`: dom0 maps pages a guest granted to it.
//!
//! `IOCTL_GNTDEV_MAP_GRANT_REF` reserves a range of the device's file offsets for a list
//! of `(domid, ref)` pairs; the grants are actually mapped by the `mmap` at that offset,
//! so a bad reference makes the `mmap` fail, not the ioctl. On drop, [`MappedGrants`]
//! unmaps and then releases the range with `IOCTL_GNTDEV_UNMAP_GRANT_REF`. Layouts follow
//! `linux/include/uapi/xen/gntdev.h`.

use crate::error::XenError;
use crate::gntalloc::{UnmapNotify, UNMAP_NOTIFY_CLEAR_BYTE, UNMAP_NOTIFY_SEND_EVENT};
use crate::sys::{self, ioc_none, XEN_PAGE_SIZE};
use idm_core::RawRegion;
use std::fs::File;
use std::mem::size_of;
use std::ptr::NonNull;
use std::sync::Arc;

/// Most grants one [`GntDev::map`] maps (256 MiB). It equals the kernel's default
/// per-request limit (the `xen_gntdev.limit` parameter, 65536), and bounds what a guest
/// can make us allocate for the request buffer.
pub const MAX_MAP_GRANTS: usize = 65536;

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
struct GrantRef {
    domid: u32,
    gref: u32,
}
/// `struct ioctl_gntdev_map_grant_ref` up to its variable tail `refs[]`.
#[repr(C)]
struct MapGrantRefHead {
    count: u32,
    pad: u32,
    index: u64,
}
/// `sizeof(struct ioctl_gntdev_map_grant_ref)`: the head plus `refs[1]`.
const MAP_GRANT_REF_SIZE: usize = size_of::<MapGrantRefHead>() + size_of::<GrantRef>();
#[repr(C)]
struct UnmapGrantRef {
    index: u64,
    count: u32,
    pad: u32,
}
const _: () = assert!(size_of::<GrantRef>() == 8);
const _: () = assert!(size_of::<MapGrantRefHead>() == 16 && MAP_GRANT_REF_SIZE == 24);
const _: () = assert!(size_of::<UnmapGrantRef>() == 16);

const IOCTL_GNTDEV_MAP_GRANT_REF: u32 = ioc_none(b'G', 0, MAP_GRANT_REF_SIZE);
const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 = ioc_none(b'G', 1, size_of::<UnmapGrantRef>());
const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u32 = ioc_none(b'G', 7, size_of::<UnmapNotify>());

/// An open `/dev/xen/gntdev`.
#[derive(Debug)]
pub struct GntDev {
    file: Arc<File>,
}

impl GntDev {
    /// Path of the device.
    pub const PATH: &'static str = "/dev/xen/gntdev";

    /// Opens the device (in dom0 or a driver domain with the `xen_gntdev` driver).
    pub fn open() -> Result<Self, XenError> {
        sys::check_page_size()?;
        Ok(GntDev { file: Arc::new(sys::open_device(Self::PATH, false)?) })
    }

    /// Maps the pages `refs` that domain `domid` granted us, contiguously and in order;
    /// read-write if `writable` (every grant must then be writable).
    pub fn map(&self, domid: u32, refs: &[u32], writable: bool) -> Result<MappedGrants, XenError> {
        let count = refs.len();
        if count == 0 || count > MAX_MAP_GRANTS {
            return Err(XenError::InvalidArgument("gntdev grant count must be 1..=MAX_MAP_GRANTS"));
        }
        // Word 0: count and pad; word 1: the index the kernel returns; then one
        // `{domid, ref}` pair per word, in memory order.
        let mut buf = vec![0u64; 2 + count];
        buf[0] = u64::from_ne_bytes(pair(count as u32, 0));
        for (w, r) in buf[2..].iter_mut().zip(refs) {
            *w = u64::from_ne_bytes(pair(domid, *r));
        }
        let fail = |step, source| XenError::GrantMap { step, domid, count, source };
        // SAFETY: `buf` holds the 24-byte struct the request number encodes, and the
        // kernel reads exactly `count` pairs from byte 16, which `buf` holds.
        unsafe {
            sys::ioctl(&self.file, IOCTL_GNTDEV_MAP_GRANT_REF, buf.as_mut_ptr().cast(), "IOCTL_GNTDEV_MAP_GRANT_REF")
        }
        .map_err(|e| {
            let source = match e {
                XenError::Os { source, .. } => source,
                other => std::io::Error::other(other.to_string()),
            };
            fail("IOCTL_GNTDEV_MAP_GRANT_REF", source)
        })?;
        let index = buf[1];
        let len = count * XEN_PAGE_SIZE;
        let ptr = match sys::mmap_shared(&self.file, len, index, writable) {
            Ok(p) => p,
            Err(source) => {
                unmap_range(&self.file, index, count);
                return Err(fail("mmap (a reference is bad, not granted to this domain, or read-only)", source));
            }
        };
        let raw = if writable {
            // SAFETY: `ptr` is a fresh page-aligned read-write mapping of `len` bytes that
            // stays mapped until `MappedGrants::drop`, after this region (a field of it)
            // can no longer be used; all access goes through `RawRegion`'s atomics. Grant
            // mappings are backed for their whole life, so accesses cannot fault.
            Some(unsafe { RawRegion::new(ptr, len) })
        } else {
            None
        };
        Ok(MappedGrants { file: Arc::clone(&self.file), index, count, ptr, raw })
    }
}

fn pair(a: u32, b: u32) -> [u8; 8] {
    let mut w = [0u8; 8];
    w[..4].copy_from_slice(&a.to_ne_bytes());
    w[4..].copy_from_slice(&b.to_ne_bytes());
    w
}

fn unmap_range(file: &File, index: u64, count: usize) {
    let mut op = UnmapGrantRef { index, count: count as u32, pad: 0 };
    // SAFETY: `op` is the struct the request number encodes, alive for the call.
    let rc =
        unsafe { sys::ioctl(file, IOCTL_GNTDEV_UNMAP_GRANT_REF, (&raw mut op).cast(), "IOCTL_GNTDEV_UNMAP_GRANT_REF") };
    debug_assert!(rc.is_ok(), "unmap of our own grant range failed: {rc:?}");
}

/// A guest's grants mapped here; unmapped on drop.
///
/// The guest may write them at any time: access goes through [`MappedGrants::region`]
/// (atomics), never through references.
#[derive(Debug)]
pub struct MappedGrants {
    file: Arc<File>,
    index: u64,
    count: usize,
    ptr: NonNull<u8>,
    /// Present for read-write mappings only: `RawRegion` may write.
    raw: Option<RawRegion>,
}

// SAFETY: `MappedGrants` never dereferences `ptr` itself; it hands out the address and a
// `RawRegion` (itself Send + Sync, atomics only), and unmapping works from any thread.
unsafe impl Send for MappedGrants {}
// SAFETY: as above; `&MappedGrants` gives no non-atomic access to the memory.
unsafe impl Sync for MappedGrants {}

impl MappedGrants {
    /// The base address of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes (grants × 4096).
    pub fn len(&self) -> usize {
        self.count * XEN_PAGE_SIZE
    }

    /// Always false: a mapping covers at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The mapping as an `idm_core` region; `None` for a read-only mapping.
    pub fn region(&self) -> Option<&RawRegion> {
        self.raw.as_ref()
    }

    /// Asks the kernel, when this mapping is finally torn down (for instance because this
    /// process died), to clear the byte at `offset` (read-write mappings only) and, with
    /// `port`, to signal that event channel, so the guest learns that we are gone.
    pub fn set_unmap_notify(&self, offset: usize, port: Option<u32>) -> Result<(), XenError> {
        if offset >= self.len() {
            return Err(XenError::InvalidArgument("unmap-notify offset outside the mapping"));
        }
        let clear = if self.raw.is_some() { UNMAP_NOTIFY_CLEAR_BYTE } else { 0 };
        let mut op = UnmapNotify {
            index: self.index + offset as u64,
            action: clear | if port.is_some() { UNMAP_NOTIFY_SEND_EVENT } else { 0 },
            event_channel_port: port.unwrap_or(0),
        };
        // SAFETY: `op` is the struct the request number encodes, alive for the call.
        unsafe {
            sys::ioctl(&self.file, IOCTL_GNTDEV_SET_UNMAP_NOTIFY, (&raw mut op).cast(), "IOCTL_GNTDEV_SET_UNMAP_NOTIFY")
        }?;
        Ok(())
    }
}

impl Drop for MappedGrants {
    fn drop(&mut self) {
        self.raw = None;
        // SAFETY: this is the whole mapping made in `map`; its region was just dropped
        // and nothing else accesses it.
        unsafe { sys::munmap(self.ptr, self.len()) };
        unmap_range(&self.file, self.index, self.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_header() {
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
        assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x0010_4701);
        assert_eq!(IOCTL_GNTDEV_SET_UNMAP_NOTIFY, 0x0010_4707);
    }

    #[test]
    fn open_without_xen_names_the_device() {
        if std::path::Path::new(GntDev::PATH).exists() {
            return;
        }
        let msg = GntDev::open().unwrap_err().to_string();
        assert!(msg.contains(GntDev::PATH) && msg.contains("is this a Xen domain?"), "{msg}");
    }
}
