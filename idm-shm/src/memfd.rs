//! Shared memory backed by a sealed memfd, mapped `MAP_SHARED` into this process.
//!
//! The creating side makes the memfd, sets its size and seals it against shrinking and
//! growing ([`MemfdRegion::create`]); the receiving side checks the seals, then the size,
//! and only then maps it ([`MemfdRegion::from_fd`]). The order matters: once
//! `F_SEAL_SHRINK` is on, the size we check is the size we keep, so a hostile peer cannot
//! truncate the file later and make our accesses fault with `SIGBUS`. Seals can only be
//! added, never removed, so the check cannot be undone.
//!
//! A `MemfdRegion` is a cheap handle: clones share one mapping, which is unmapped when the
//! last clone is dropped. Every access goes through [`idm_core::RawRegion`], i.e. atomic
//! loads and stores, never Rust references into the mapping.

use crate::error::ShmError;
use idm_core::{RawRegion, SharedMemory};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Seals a region must carry before we map it.
const REQUIRED_SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
/// Seals that would stop us mapping the region writable.
const FORBIDDEN_SEALS: i32 = libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE;

/// A sealed memfd mapped shared and read-write; clones share the mapping.
#[derive(Clone, Debug)]
pub struct MemfdRegion {
    inner: Arc<Mapping>,
}

/// The mapping and the descriptor it came from; unmapped on drop.
#[derive(Debug)]
struct Mapping {
    raw: RawRegion,
    fd: OwnedFd,
}

impl MemfdRegion {
    /// Creates a zero-filled memfd of `size` bytes named `name` (visible in
    /// `/proc/PID/fd`), seals its size and maps it.
    pub fn create(name: &str, size: usize) -> Result<Self, ShmError> {
        if size == 0 {
            return Err(ShmError::InvalidArgument("a shared region cannot be empty"));
        }
        let cname = CString::new(name).map_err(|_| ShmError::InvalidArgument("memfd name contains a NUL byte"))?;
        let fd = sys::memfd_create(&cname)?;
        sys::ftruncate(fd.as_fd(), size)?;
        // F_SEAL_SEAL too: the seal set is final, nobody can later add F_SEAL_WRITE.
        sys::add_seals(fd.as_fd(), REQUIRED_SEALS | libc::F_SEAL_SEAL)?;
        Self::map(fd, size)
    }

    /// Maps a memfd received from a peer, after checking that it is a memfd sealed against
    /// resizing, writable, and exactly `expected_size` bytes long.
    pub fn from_fd(fd: OwnedFd, expected_size: usize) -> Result<Self, ShmError> {
        // Seals first: once SHRINK is set the size below cannot change any more.
        let seals = sys::get_seals(fd.as_fd())?;
        if seals & REQUIRED_SEALS != REQUIRED_SEALS {
            return Err(ShmError::NotSealed { seals });
        }
        if seals & FORBIDDEN_SEALS != 0 {
            return Err(ShmError::WriteSealed { seals });
        }
        let actual = sys::regular_file_size(fd.as_fd())?;
        if actual != expected_size as u64 || expected_size == 0 {
            return Err(ShmError::SizeMismatch { expected: expected_size as u64, actual });
        }
        Self::map(fd, expected_size)
    }

    fn map(fd: OwnedFd, size: usize) -> Result<Self, ShmError> {
        let raw = sys::map_shared(fd.as_fd(), size)?;
        Ok(MemfdRegion { inner: Arc::new(Mapping { raw, fd }) })
    }

    /// The memfd, to send to the peer.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }

    /// The region as an `idm_core` raw region.
    pub fn raw(&self) -> &RawRegion {
        &self.inner.raw
    }
}

/// A memfd of `size` bytes without any seals, for tests of the receiving side.
#[cfg(test)]
pub(crate) fn unsealed_memfd(size: usize) -> OwnedFd {
    let fd = sys::memfd_create(&CString::new("unsealed").expect("no NUL")).expect("memfd_create");
    sys::ftruncate(fd.as_fd(), size).expect("ftruncate");
    fd
}

impl SharedMemory for MemfdRegion {
    #[inline]
    fn size(&self) -> usize {
        self.inner.raw.size()
    }
    #[inline]
    fn load_u32(&self, offset: usize, order: Ordering) -> u32 {
        self.inner.raw.load_u32(offset, order)
    }
    #[inline]
    fn store_u32(&self, offset: usize, value: u32, order: Ordering) {
        self.inner.raw.store_u32(offset, value, order)
    }
    #[inline]
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        self.inner.raw.read_bytes(offset, dst)
    }
    #[inline]
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        self.inner.raw.write_bytes(offset, src)
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        sys::unmap(&self.raw);
    }
}

/// The system calls, each checked; the only `unsafe` of this module.
#[allow(unsafe_code)]
mod sys {
    use super::*;

    pub(super) fn memfd_create(name: &CString) -> Result<OwnedFd, ShmError> {
        // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(ShmError::last_os("memfd_create for the shared region"));
        }
        // SAFETY: `fd` was just returned by memfd_create, is open, and is owned by nobody
        // else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub(super) fn ftruncate(fd: BorrowedFd<'_>, size: usize) -> Result<(), ShmError> {
        let len = libc::off_t::try_from(size)
            .map_err(|_| ShmError::InvalidArgument("shared region size does not fit off_t"))?;
        // SAFETY: plain system call on a valid descriptor; no memory is passed.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
            return Err(ShmError::last_os("ftruncate of the shared region"));
        }
        Ok(())
    }

    pub(super) fn add_seals(fd: BorrowedFd<'_>, seals: i32) -> Result<(), ShmError> {
        // SAFETY: plain fcntl on a valid descriptor; no memory is passed.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(ShmError::last_os("sealing the shared region (F_ADD_SEALS)"));
        }
        Ok(())
    }

    pub(super) fn get_seals(fd: BorrowedFd<'_>) -> Result<i32, ShmError> {
        // SAFETY: plain fcntl on a valid descriptor; no memory is passed.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: the file does not support sealing, so it is not a memfd.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Err(ShmError::NotMemfd);
            }
            return Err(ShmError::io("reading the shared region's seals (F_GET_SEALS)", e));
        }
        Ok(seals)
    }

    pub(super) fn regular_file_size(fd: BorrowedFd<'_>) -> Result<u64, ShmError> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `st` is valid for writes of one `stat`, which fstat fills on success.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
            return Err(ShmError::last_os("fstat of the shared region"));
        }
        // SAFETY: fstat returned 0, so it initialised `st`.
        let st = unsafe { st.assume_init() };
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(ShmError::NotMemfd);
        }
        Ok(st.st_size as u64)
    }

    pub(super) fn map_shared(fd: BorrowedFd<'_>, size: usize) -> Result<RawRegion, ShmError> {
        // SAFETY: asks the kernel for a fresh mapping at an address of its choosing; no
        // existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(ShmError::last_os("mmap of the shared region"));
        }
        let base = NonNull::new(ptr.cast::<u8>()).expect("mmap never returns null on success");
        // SAFETY: the mapping is page-aligned (so 8-byte aligned), `size` bytes long, and
        // stays mapped until `unmap` runs in `Mapping::drop`, after the last clone holding
        // this `RawRegion` is gone. It is file-backed by a memfd sealed against shrinking
        // (checked by the caller, or sealed by us), so accesses cannot fault. Nothing forms
        // references into it: all access goes through `RawRegion`'s atomics.
        Ok(unsafe { RawRegion::new(base, size) })
    }

    pub(super) fn unmap(raw: &RawRegion) {
        // SAFETY: `raw` describes exactly the mapping made in `map_shared`; the `Mapping`
        // owning it is being dropped, so nothing can access it any more.
        let rc = unsafe { libc::munmap(raw.as_ptr().cast(), raw.size()) };
        debug_assert_eq!(rc, 0, "munmap of our own mapping failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_write_and_map_again() {
        let a = MemfdRegion::create("test", 8192).unwrap();
        a.store_u32(4096, 0xfeed, Ordering::SeqCst);
        let fd = a.fd().try_clone_to_owned().unwrap();
        let b = MemfdRegion::from_fd(fd, 8192).unwrap();
        assert_eq!(b.load_u32(4096, Ordering::SeqCst), 0xfeed);
        b.write_bytes(10, b"hello");
        let mut out = [0u8; 5];
        a.read_bytes(10, &mut out);
        assert_eq!(&out, b"hello");
    }

    #[test]
    fn wrong_size_is_refused() {
        let a = MemfdRegion::create("test", 8192).unwrap();
        let fd = a.fd().try_clone_to_owned().unwrap();
        assert!(matches!(MemfdRegion::from_fd(fd, 4096), Err(ShmError::SizeMismatch { expected: 4096, actual: 8192 })));
    }

    #[test]
    fn unsealed_memfd_is_refused() {
        let fd = sys::memfd_create(&CString::new("unsealed").unwrap()).unwrap();
        sys::ftruncate(fd.as_fd(), 4096).unwrap();
        let e = MemfdRegion::from_fd(fd, 4096).unwrap_err();
        assert!(matches!(e, ShmError::NotSealed { .. }), "{e}");
        // Shrink-sealed only is not enough either.
        let fd = sys::memfd_create(&CString::new("half").unwrap()).unwrap();
        sys::ftruncate(fd.as_fd(), 4096).unwrap();
        sys::add_seals(fd.as_fd(), libc::F_SEAL_SHRINK).unwrap();
        assert!(matches!(MemfdRegion::from_fd(fd, 4096), Err(ShmError::NotSealed { .. })));
    }

    #[test]
    fn write_sealed_memfd_is_refused() {
        let fd = sys::memfd_create(&CString::new("ro").unwrap()).unwrap();
        sys::ftruncate(fd.as_fd(), 4096).unwrap();
        sys::add_seals(fd.as_fd(), REQUIRED_SEALS | libc::F_SEAL_WRITE).unwrap();
        assert!(matches!(MemfdRegion::from_fd(fd, 4096), Err(ShmError::WriteSealed { .. })));
    }

    #[test]
    fn non_memfd_is_refused() {
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = MemfdRegion::from_fd(r.into(), 4096).unwrap_err();
        assert!(matches!(e, ShmError::NotMemfd), "{e}");
    }
}
