//! A doorbell made of futex words in the shared region.
//!
//! Each side owns one *bell* word in the control page (see [`crate::layout`]) and sleeps on
//! it; the other side rings it by incrementing it and calling `FUTEX_WAKE`. The token a
//! waiter arms with is the bell's value, so a ring that lands between arming and sleeping
//! makes `FUTEX_WAIT` return at once (`EAGAIN`): no lost wake-ups. The futex operations
//! are the non-private ones, because the word lives in a `MAP_SHARED` mapping that two
//! processes see at different addresses.
//!
//! The ring's *wanted* words already suppress notifications nobody waits for, so a polling
//! peer costs no system calls at all.
//!
//! # Peer death
//! A futex has no notion of the process on the other end: if the peer dies, nobody will
//! ever ring our bell. So a wait never sleeps longer than [`LIVENESS_INTERVAL`] in one go.
//! Each time a slice runs out, the waiter checks
//! 1. the peer's *closed* word, which the peer sets (and then rings us) when it hangs up
//!    in an orderly way — this is noticed at once, and
//! 2. the optional [`PeerWatch`] (the handshake socket): `poll` reports a hang-up when the
//!    peer process is gone, however it died — this is noticed within one slice.
//!
//! Either makes the wait fail with [`NotifyError::PeerGone`]. We chose bounded slices over
//! a pidfd or an extra file descriptor per wait because the futex stays the only thing on
//! the hot path, a slice timeout costs one `poll` every 100 ms of idleness, and the
//! socket's hang-up also covers peers that are not our children or live in another PID
//! namespace. A peer that forked and left the socket open in a child is only noticed once
//! that child is gone too; its *closed* word still covers the orderly case.
//!
//! The *closed* word is peer-writable like everything else: a peer that sets ours only
//! makes its own connection fail.

use crate::handshake::PeerWatch;
use crate::layout::field;
use crate::memfd::MemfdRegion;
use idm_core::notify::{Notifier, NotifyError, WaitOutcome, WaitToken, Waiter};
use idm_core::SharedMemory;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest single sleep before a waiter re-checks that its peer is alive.
pub const LIVENESS_INTERVAL: Duration = Duration::from_millis(100);

/// Which end of the channel this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The side that created the region and connected.
    Client,
    /// The side that accepted.
    Server,
}

/// One side's doorbell: waits on its own bell, rings the peer's. Clones share it; when
/// the last clone is dropped the side is marked closed and the peer is woken.
#[derive(Clone, Debug)]
pub struct FutexDoorbell {
    inner: Arc<Bell>,
}

#[derive(Debug)]
struct Bell {
    region: MemfdRegion,
    own_bell: usize,
    peer_bell: usize,
    own_closed: usize,
    peer_closed: usize,
    watch: Option<PeerWatch>,
    interval: Duration,
}

impl FutexDoorbell {
    /// The doorbell of `side` in a region laid out by [`crate::ChannelLayout`].
    ///
    /// # Panics
    /// If the region is smaller than the control page (a bug: layouts check this).
    pub fn new(region: MemfdRegion, side: Side, watch: Option<PeerWatch>) -> Self {
        assert!(region.size() >= crate::layout::PAGE, "region lacks the control page");
        let (own_bell, peer_bell, own_closed, peer_closed) = match side {
            Side::Client => (field::CLIENT_BELL, field::SERVER_BELL, field::CLIENT_CLOSED, field::SERVER_CLOSED),
            Side::Server => (field::SERVER_BELL, field::CLIENT_BELL, field::SERVER_CLOSED, field::CLIENT_CLOSED),
        };
        FutexDoorbell {
            inner: Arc::new(Bell {
                region,
                own_bell,
                peer_bell,
                own_closed,
                peer_closed,
                watch,
                interval: LIVENESS_INTERVAL,
            }),
        }
    }

    /// Whether the peer has hung up: its *closed* word is set, or the watched socket
    /// reports a hang-up.
    pub fn peer_gone(&self) -> bool {
        self.inner.peer_closed_word() || self.inner.watch.as_ref().is_some_and(|w| w.is_gone())
    }

    /// Marks this side closed and wakes the peer, so it notices at once. Dropping the last
    /// clone does the same.
    pub fn close(&self) {
        self.inner.close();
    }
}

impl Bell {
    fn peer_closed_word(&self) -> bool {
        self.region.load_u32(self.peer_closed, SeqCst) != 0
    }

    fn ring(&self, off: usize) -> Result<(), NotifyError> {
        sys::fetch_add(&self.region, off);
        sys::futex_wake(&self.region, off).map_err(NotifyError::Os)
    }

    fn close(&self) {
        self.region.store_u32(self.own_closed, 1, SeqCst);
        // Best effort: a failed wake only delays the peer until its next liveness check.
        let _ = self.ring(self.peer_bell);
    }
}

impl Drop for Bell {
    fn drop(&mut self) {
        self.close();
    }
}

impl Notifier for FutexDoorbell {
    fn notify(&self) -> Result<(), NotifyError> {
        let b = &*self.inner;
        if b.peer_closed_word() {
            return Err(NotifyError::PeerGone);
        }
        b.ring(b.peer_bell)
    }
}

impl Waiter for FutexDoorbell {
    fn arm(&self) -> WaitToken {
        WaitToken(self.inner.region.load_u32(self.inner.own_bell, SeqCst))
    }

    fn wait(&self, token: WaitToken, timeout: Option<Duration>) -> Result<WaitOutcome, NotifyError> {
        let b = &*self.inner;
        if b.peer_closed_word() {
            return Err(NotifyError::PeerGone);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(b.interval),
                None => b.interval,
            };
            match sys::futex_wait(&b.region, b.own_bell, token.0, slice) {
                // Woken, the bell already moved on (EAGAIN), or a signal (EINTR): the
                // caller re-checks its condition either way.
                Ok(()) => return Ok(WaitOutcome::Woken),
                Err(libc::EAGAIN) | Err(libc::EINTR) => return Ok(WaitOutcome::Woken),
                Err(libc::ETIMEDOUT) => {
                    if self.peer_gone() {
                        return Err(NotifyError::PeerGone);
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(WaitOutcome::TimedOut);
                    }
                }
                Err(e) => return Err(NotifyError::Os(e)),
            }
        }
    }
}

/// The futex system calls on words of the region.
#[allow(unsafe_code)]
mod sys {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// The address of the `u32` at `off`, checked to lie inside the region and be aligned.
    fn word(region: &MemfdRegion, off: usize) -> *mut u32 {
        assert!(off % 4 == 0 && off + 4 <= region.size(), "futex word out of bounds");
        region.raw().as_ptr().wrapping_add(off).cast::<u32>()
    }

    pub(super) fn fetch_add(region: &MemfdRegion, off: usize) {
        let p = word(region, off);
        // SAFETY: `p` is inside the mapping and 4-byte aligned (checked in `word`), the
        // mapping lives as long as `region`, and the region is only ever accessed
        // atomically (the `RawRegion` contract), so an `AtomicU32` view is sound.
        let a = unsafe { AtomicU32::from_ptr(p) };
        a.fetch_add(1, SeqCst);
    }

    pub(super) fn futex_wake(region: &MemfdRegion, off: usize) -> Result<(), i32> {
        let p = word(region, off);
        // SAFETY: FUTEX_WAKE only uses the address as a key to find waiters; it is a valid,
        // aligned word of a live shared mapping.
        let rc = unsafe {
            libc::syscall(libc::SYS_futex, p, libc::FUTEX_WAKE, i32::MAX, std::ptr::null::<libc::timespec>())
        };
        if rc < 0 {
            return Err(errno());
        }
        Ok(())
    }

    /// Sleeps while the word at `off` equals `expected`, at most `timeout`. Returns the
    /// errno on failure (`EAGAIN`, `EINTR`, `ETIMEDOUT` are expected outcomes).
    pub(super) fn futex_wait(region: &MemfdRegion, off: usize, expected: u32, timeout: Duration) -> Result<(), i32> {
        let p = word(region, off);
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the kernel reads the word at `p` (a valid, aligned word of a live shared
        // mapping) atomically and the timespec `ts`, which lives across the call.
        let rc = unsafe { libc::syscall(libc::SYS_futex, p, libc::FUTEX_WAIT, expected, &ts as *const libc::timespec) };
        if rc < 0 {
            return Err(errno());
        }
        Ok(())
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{ChannelLayout, ShmLayout};

    fn pair() -> (FutexDoorbell, FutexDoorbell) {
        let layout = ChannelLayout::new(4096, 0).unwrap();
        let region = layout.create_region("futex-test").unwrap();
        (FutexDoorbell::new(region.clone(), Side::Client, None), FutexDoorbell::new(region, Side::Server, None))
    }

    #[test]
    fn notify_wakes_a_sleeping_waiter() {
        let (client, server) = pair();
        let token = server.arm();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                client.notify().unwrap();
            });
            assert_eq!(server.wait(token, None), Ok(WaitOutcome::Woken));
        });
    }

    #[test]
    fn notify_between_arm_and_wait_is_not_lost() {
        let (client, server) = pair();
        let token = server.arm();
        client.notify().unwrap();
        assert_eq!(server.wait(token, Some(Duration::from_secs(5))), Ok(WaitOutcome::Woken));
    }

    #[test]
    fn timeout_passes() {
        let (_client, server) = pair();
        let token = server.arm();
        let t = Instant::now();
        assert_eq!(server.wait(token, Some(Duration::from_millis(250))), Ok(WaitOutcome::TimedOut));
        assert!(t.elapsed() >= Duration::from_millis(250));
    }

    #[test]
    fn dropped_peer_is_reported_gone_at_once() {
        let (client, server) = pair();
        let token = server.arm();
        std::thread::scope(|s| {
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                drop(client);
            });
            // Woken by the close, or already gone: either way the next wait says so.
            let r = server.wait(token, None);
            let r = match r {
                Ok(WaitOutcome::Woken) => server.wait(server.arm(), None),
                other => other,
            };
            assert_eq!(r, Err(NotifyError::PeerGone));
        });
        assert_eq!(server.notify(), Err(NotifyError::PeerGone));
    }
}
