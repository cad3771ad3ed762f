//! Device output: what kernels print (`printf`, failed `assert`s). The driver writes it to
//! the standard output and error of the process that owns the context — the zone's
//! worker — when the context synchronises. The program that launched the kernels is in
//! the guest, so the worker captures its own descriptors 1 and 2 in pipes, keeps what
//! arrives (bounded) and tells the guest on the next reply ([`idm_core::Server::raise_notice`]);
//! the guest fetches it with `TakeDeviceOutput` and writes it to its own stdout and
//! stderr. The worker's log moves to a duplicate of the original stderr first.
//!
//! Cost: a reader thread drains the pipes as they fill (a kernel may print more than a
//! pipe holds, and a driver blocked on a full pipe would hang the zone); after a request
//! that synchronises, if a kernel was launched since the last such request, the worker
//! looks at the pipes itself (one `poll` without waiting, and the reads when there is
//! something) so that what the synchronisation printed rides on its own reply. Other
//! requests pay an atomic load or two.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Most bytes kept per stream while the guest has not fetched them; more is dropped and
/// counted (a zone printing without bound cannot grow the worker without bound).
pub const KEEP_BYTES: usize = 4 << 20;

/// What was captured and not yet taken.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Captured {
    /// Bytes written to descriptor 1.
    pub stdout: Vec<u8>,
    /// Bytes written to descriptor 2.
    pub stderr: Vec<u8>,
    /// Bytes dropped because [`KEEP_BYTES`] were already waiting.
    pub dropped: u64,
}

#[derive(Debug)]
struct Pipes {
    out: OwnedFd,
    err: OwnedFd,
}

/// The worker's captured descriptors 1 and 2.
#[derive(Debug)]
pub struct DeviceOutput {
    pipes: Pipes,
    kept: Mutex<Captured>,
    pending: AtomicBool,
    /// A kernel was launched since the last flush check: only then can a flushing
    /// request have printed anything.
    launched: AtomicBool,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A pipe whose read end does not block: (read, write), both close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: a valid array of two descriptors for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded: both descriptors are new and owned by nobody else.
    let r = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: as above.
    let w = unsafe { OwnedFd::from_raw_fd(fds[1]) };
    // SAFETY: a descriptor we own; F_SETFL with O_NONBLOCK has no memory effects.
    cvt(unsafe { libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) })?;
    Ok((r, w))
}

extern "C" {
    /// glibc's `stdout` stream.
    #[link_name = "stdout"]
    static mut C_STDOUT: *mut libc::FILE;
}

impl DeviceOutput {
    /// Captures this process's descriptors 1 and 2 and returns the capture with a file for
    /// the log (the original stderr). Call it once, before the driver is loaded and before
    /// any thread writes to stdout or stderr.
    pub fn capture() -> io::Result<(Arc<DeviceOutput>, File)> {
        // SAFETY: duplicating descriptor 2 (open for the process's life) has no memory effects.
        let log = cvt(unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) })?;
        // SAFETY: fcntl returned a new descriptor that nothing else owns.
        let log = unsafe { File::from_raw_fd(log) };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        // SAFETY: replaces descriptors 1 and 2 with the pipes' write ends (dup2 closes the
        // old ones atomically); our owned write ends are dropped after, the copies stay.
        cvt(unsafe { libc::dup2(out_w.as_raw_fd(), 1) })?;
        // SAFETY: as above.
        cvt(unsafe { libc::dup2(err_w.as_raw_fd(), 2) })?;
        drop((out_w, err_w));
        // The driver prints with stdio: unbuffered, its bytes reach the pipe when it
        // writes them, not when a buffer fills.
        // SAFETY: glibc's `stdout` is initialised before main and only read here.
        let c_stdout = unsafe { C_STDOUT };
        // SAFETY: a live stream; setvbuf before any output on it (this runs before the
        // driver is loaded) is its documented use.
        unsafe { libc::setvbuf(c_stdout, std::ptr::null_mut(), libc::_IONBF, 0) };
        let this = Arc::new(DeviceOutput {
            pipes: Pipes { out: out_r, err: err_r },
            kept: Mutex::new(Captured::default()),
            pending: AtomicBool::new(false),
            launched: AtomicBool::new(false),
        });
        let reader = Arc::clone(&this);
        std::thread::Builder::new().name("device-output".into()).spawn(move || reader.read_forever())?;
        Ok((this, log))
    }

    /// The reader thread: waits for either pipe and drains it.
    fn read_forever(&self) {
        loop {
            let mut fds = [
                libc::pollfd { fd: self.pipes.out.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.pipes.err.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: a valid array of two pollfds; no timeout.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
            self.drain();
        }
    }

    /// Reads what the pipes hold now (without waiting) into the kept bytes.
    pub fn drain(&self) {
        let Ok(mut kept) = self.kept.lock() else { return };
        let kept = &mut *kept;
        let got = read_available(&self.pipes.out, &mut kept.stdout, &mut kept.dropped)
            | read_available(&self.pipes.err, &mut kept.stderr, &mut kept.dropped);
        if got {
            self.pending.store(true, Ordering::Release);
        }
    }

    /// Records that a kernel was launched (it may print at the next flush).
    pub fn note_launch(&self) {
        self.launched.store(true, Ordering::Relaxed);
    }

    /// After a request that flushes the driver's printf buffer: if a kernel was launched
    /// since the last time, looks at the pipes once (one `poll`, no waiting) and drains
    /// what is there, so that it rides on this request's reply. Without a launch in
    /// between it costs nothing: nothing can have been printed.
    pub fn after_flush(&self) {
        if !self.launched.swap(false, Ordering::Relaxed) {
            return;
        }
        let mut fds = [
            libc::pollfd { fd: self.pipes.out.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: self.pipes.err.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: a valid array of two pollfds; zero timeout.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, 0) } > 0 {
            self.drain();
        }
    }

    /// Whether bytes wait to be taken.
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Takes up to `max` bytes (stdout first, then stderr, in the order each was written),
    /// and the count of dropped bytes; what is left stays pending.
    pub fn take(&self, max: usize) -> Captured {
        let Ok(mut kept) = self.kept.lock() else { return Captured::default() };
        let n_out = kept.stdout.len().min(max);
        let stdout: Vec<u8> = kept.stdout.drain(..n_out).collect();
        let n_err = kept.stderr.len().min(max - n_out);
        let stderr: Vec<u8> = kept.stderr.drain(..n_err).collect();
        let dropped = std::mem::take(&mut kept.dropped);
        self.pending.store(!kept.stdout.is_empty() || !kept.stderr.is_empty(), Ordering::Release);
        Captured { stdout, stderr, dropped }
    }
}

/// Reads everything `fd` holds now into `into`, keeping at most [`KEEP_BYTES`] there (the
/// rest counted in `dropped`). Whether anything was read.
fn read_available(fd: &OwnedFd, into: &mut Vec<u8>, dropped: &mut u64) -> bool {
    let mut buf = [0u8; 16 * 1024];
    let mut got = false;
    loop {
        // SAFETY: reads into a local buffer of its length from a descriptor we own.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            // 0: every writer is gone; < 0: EAGAIN (empty), EINTR (next drain) or worse.
            return got;
        }
        got = true;
        let n = n as usize;
        let room = KEEP_BYTES.saturating_sub(into.len()).min(n);
        into.extend_from_slice(&buf[..room]);
        *dropped += (n - room) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_bytes_are_bounded_and_the_rest_counted() {
        let (r, w) = pipe().unwrap();
        let mut w = File::from(w);
        let chunk = vec![b'x'; 64 * 1024];
        let (mut kept, mut dropped) = (vec![b'a'; KEEP_BYTES - 10], 0u64);
        io::Write::write_all(&mut w, &chunk).unwrap();
        assert!(read_available(&r, &mut kept, &mut dropped));
        assert_eq!((kept.len(), dropped), (KEEP_BYTES, 64 * 1024 - 10));
        assert!(!read_available(&r, &mut kept, &mut dropped), "an empty pipe does not block");
    }
}
