//! Unix-socket system calls std does not offer: passing a descriptor with `SCM_RIGHTS`,
//! reading the peer's credentials (`SO_PEERCRED`), and polling for a hang-up.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// The credentials of the process at the other end of a unix socket, as the kernel
/// recorded them when it connected (they cannot be forged by the peer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id (in this side's PID namespace; 0 if the peer is outside it).
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// At most this many descriptors are accepted from one message; more are counted as
/// [`Received::truncated`] and closed by the kernel or by us.
const MAX_FDS: usize = 4;

/// What one `recvmsg` brought.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes of data.
    pub len: usize,
    /// Descriptors, already owned (closed when dropped).
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped control data (more descriptors than we had room for).
    pub truncated: bool,
}

#[allow(unsafe_code)]
mod sys {
    use super::*;

    /// Control buffer: `cmsghdr` needs `usize` alignment; room for `MAX_FDS` descriptors.
    #[repr(C, align(8))]
    struct CmsgBuf([u8; 64]);
    // CMSG_SPACE(4 * MAX_FDS) = 16 + 16 on 64-bit Linux.
    const _: () = assert!(std::mem::size_of::<libc::cmsghdr>() + 4 * MAX_FDS <= 64);

    fn cmsg_space(bytes: usize) -> usize {
        // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
        unsafe { libc::CMSG_SPACE(bytes as u32) as usize }
    }

    fn cmsg_len(bytes: usize) -> usize {
        // SAFETY: CMSG_LEN is pure arithmetic on its argument.
        unsafe { libc::CMSG_LEN(bytes as u32) as usize }
    }

    /// Sends `data` with `fd` attached; the descriptor rides on the first byte, the rest
    /// of `data` is written after if the kernel took only part of it.
    pub(crate) fn send_with_fd(stream: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
        let mut cbuf = CmsgBuf([0; 64]);
        let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
        // SAFETY: an all-zero msghdr is a valid empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = cmsg_space(4) as _;
        // SAFETY: `msg` points at `cbuf`, which is aligned and large enough for one cmsghdr
        // with one descriptor (asserted above), so CMSG_FIRSTHDR returns a valid pointer
        // into it.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        assert!(!cmsg.is_null(), "control buffer holds one header");
        // SAFETY: an all-zero cmsghdr is valid (it is plain integers, plus padding on some
        // libcs); the fields are set below.
        let mut hdr: libc::cmsghdr = unsafe { std::mem::zeroed() };
        hdr.cmsg_level = libc::SOL_SOCKET;
        hdr.cmsg_type = libc::SCM_RIGHTS;
        hdr.cmsg_len = cmsg_len(4) as _;
        // SAFETY: `cmsg` points into `cbuf`, which is aligned for and large enough to hold
        // one header plus one descriptor (asserted above).
        unsafe { cmsg.write(hdr) };
        // SAFETY: `cmsg` is a valid header inside `msg`'s control buffer.
        let data = unsafe { libc::CMSG_DATA(cmsg) };
        // SAFETY: the descriptor slot lies inside `cmsg_space(4)` bytes of `cbuf`; it may be
        // unaligned, hence write_unaligned.
        unsafe { data.cast::<RawFd>().write_unaligned(fd.as_raw_fd()) };
        loop {
            // SAFETY: `msg` describes `data` (via `iov`) and `cbuf`, all alive across the
            // call; the kernel only reads them.
            let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Receives into `buf`, collecting any descriptors (close-on-exec).
    pub(crate) fn recv_with_fds(stream: &UnixStream, buf: &mut [u8]) -> io::Result<Received> {
        let mut cbuf = CmsgBuf([0; 64]);
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: an all-zero msghdr is a valid empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = cbuf.0.len() as _;
        let n = loop {
            // SAFETY: `msg` describes `buf` and `cbuf`, both writable and alive across the
            // call; the kernel writes at most their lengths.
            let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        let mut fds = Vec::new();
        // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk only the
        // `msg_controllen` bytes the kernel wrote into `cbuf`.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: non-null headers returned by CMSG_FIRSTHDR/NXTHDR lie inside `cbuf`.
            let hdr = unsafe { cmsg.read_unaligned() };
            if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
                let count = (hdr.cmsg_len as usize).saturating_sub(cmsg_len(0)) / 4;
                // SAFETY: `cmsg` is a valid header inside the received control data.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: the kernel wrote `count` descriptors after the header, inside
                    // `cbuf`; they may be unaligned, hence read_unaligned.
                    let raw = unsafe { data.wrapping_add(i).read_unaligned() };
                    // SAFETY: the kernel just installed `raw` in our table for us; nothing
                    // else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR above.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        Ok(Received { len: n, fds, truncated: msg.msg_flags & libc::MSG_CTRUNC != 0 })
    }

    pub(crate) fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
        let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes and describe a `ucred`, which is
        // what SO_PEERCRED fills.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PeerCred { pid: cred.pid, uid: cred.uid, gid: cred.gid })
    }

    /// Whether the socket's peer has hung up, without blocking.
    pub(crate) fn hung_up(fd: BorrowedFd<'_>) -> bool {
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
        // SAFETY: `p` is one valid pollfd for the duration of the call; timeout 0.
        let rc = unsafe { libc::poll(&mut p, 1, 0) };
        // A failing poll (only EINTR/ENOMEM here) says nothing; the next check retries.
        rc > 0 && p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }
}

pub(crate) use sys::{hung_up, peer_cred, recv_with_fds, send_with_fd};
