//! The Linux system-call layer shared by the device bindings: opening `/dev/xen/*`, the
//! `_IOC` encoding, `ioctl`, `poll`, `mmap`/`munmap`.

#[cfg(feature = "grants")]
use crate::error::XenError;
#[cfg(feature = "grants")]
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
#[cfg(feature = "grants")]
use std::os::unix::fs::OpenOptionsExt;
#[cfg(feature = "grants")]
use std::ptr::NonNull;
use std::time::{Duration, Instant};

// `_IOC` below is the generic Linux encoding (x86, Arm, RISC-V), which is where Xen runs.
#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "aarch64",
    target_arch = "arm",
    target_arch = "riscv64"
)))]
compile_error!("idm-xen encodes ioctl numbers with the generic Linux _IOC layout; add this architecture's");

/// Xen's page size; grant references name pages of this size.
pub const XEN_PAGE_SIZE: usize = 4096;

#[cfg(feature = "grants")]
/// `_IOC(_IOC_NONE, ty, nr, size)`: direction bits 0, size in bits 16..30.
pub(crate) const fn ioc_none(ty: u8, nr: u8, size: usize) -> u32 {
    ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32
}

#[cfg(feature = "grants")]
/// Opens a Xen device read-write (and close-on-exec, as std always does).
pub(crate) fn open_device(path: &'static str, nonblocking: bool) -> Result<File, XenError> {
    let flags = if nonblocking { libc::O_NONBLOCK } else { 0 };
    OpenOptions::new().read(true).write(true).custom_flags(flags).open(path).map_err(|source| {
        match source.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => XenError::DeviceMissing { path, source },
            _ => XenError::Os { op: path, source },
        }
    })
}

#[cfg(feature = "grants")]
/// Fails unless the CPU's page size is Xen's, since we map one grant per page.
pub(crate) fn check_page_size() -> Result<(), XenError> {
    // SAFETY: sysconf has no memory arguments.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps as usize != XEN_PAGE_SIZE {
        return Err(XenError::PageSize(ps as usize));
    }
    Ok(())
}

#[cfg(feature = "grants")]
/// Issues `ioctl(fd, req, arg)`, returning its non-negative result.
///
/// # Safety
/// `arg` must point to memory valid for reads and writes of the size encoded in `req`,
/// plus any variable-length tail the request reads or writes, for the whole call.
pub(crate) unsafe fn ioctl(fd: &File, req: u32, arg: *mut libc::c_void, op: &'static str) -> Result<i32, XenError> {
    // `as _`: the request type is c_ulong on glibc and c_int on musl; our numbers fit both.
    // SAFETY: the caller guarantees `arg` is valid for what `req` makes the kernel access.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if rc < 0 {
        return Err(XenError::os(op));
    }
    Ok(rc)
}

/// What [`poll_readable`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PollResult {
    /// Data can be read.
    Readable,
    /// POLLHUP, POLLERR or POLLNVAL without data.
    Hangup,
    /// The timeout passed.
    TimedOut,
}

/// Waits until `fd` is readable, hung up, or `timeout` passes (`None`: no limit). EINTR is
/// retried with the remaining time.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<PollResult> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so a short timeout does not become a busy zero-timeout poll.
                i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
            }
        };
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: `pfd` is one valid pollfd, alive for the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            return Ok(PollResult::TimedOut);
        }
        if pfd.revents & libc::POLLIN != 0 {
            return Ok(PollResult::Readable);
        }
        return Ok(PollResult::Hangup);
    }
}

#[cfg(feature = "grants")]
/// Maps `len` bytes of `fd` at byte offset `offset`, shared, read-write or read-only.
pub(crate) fn mmap_shared(fd: &File, len: usize, offset: u64, writable: bool) -> io::Result<NonNull<u8>> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
    // SAFETY: asks for a fresh mapping at an address of the kernel's choosing; no existing
    // memory is affected.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd.as_raw_fd(), off) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))
}

#[cfg(feature = "grants")]
/// Unmaps a mapping made by [`mmap_shared`].
///
/// # Safety
/// `(ptr, len)` must be exactly one live mapping from [`mmap_shared`] that nothing will
/// access any more.
pub(crate) unsafe fn munmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: the caller hands over a whole mapping nobody uses any more.
    let rc = unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
    debug_assert_eq!(rc, 0, "munmap of our own mapping failed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "grants")]
    #[test]
    fn ioc_matches_linux_headers() {
        // Values printed by a C program including <xen/gntalloc.h>, <xen/gntdev.h>, <xen/evtchn.h>.
        assert_eq!(ioc_none(b'G', 5, 24), 0x0018_4705);
        assert_eq!(ioc_none(b'G', 0, 24), 0x0018_4700);
        assert_eq!(ioc_none(b'E', 4, 4), 0x0004_4504);
        assert_eq!(ioc_none(b'E', 1, 8), 0x0008_4501);
    }

    #[cfg(feature = "grants")]
    #[test]
    fn missing_device_names_path_and_asks_about_xen() {
        let e = open_device("/dev/xen/does-not-exist", false).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, XenError::DeviceMissing { .. }), "{msg}");
        assert!(msg.contains("/dev/xen/does-not-exist") && msg.contains("is this a Xen domain?"), "{msg}");
    }

    #[test]
    fn poll_sees_data_timeout_and_eof() {
        use std::io::Write;
        use std::os::fd::AsFd;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(poll_readable(a.as_fd(), Some(Duration::from_millis(1))).unwrap(), PollResult::TimedOut);
        b.write_all(b"x").unwrap();
        assert_eq!(poll_readable(a.as_fd(), None).unwrap(), PollResult::Readable);
        let (c, d) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(d);
        // A closed peer reads as EOF: POLLIN together with POLLHUP.
        assert_eq!(poll_readable(c.as_fd(), None).unwrap(), PollResult::Readable);
    }
}
