//! `idm_core`'s [`Notifier`] and [`Waiter`] over an event channel.
//!
//! The token a waiter arms with is a count of events this doorbell has received. One
//! thread at a time blocks on the channel's descriptor (the *poller*); others wait on a
//! condition variable for the count to move, so an event consumed by one thread still
//! wakes every thread that armed before it. A descriptor that reports an error or hang-up
//! makes the wait fail with [`NotifyError::PeerGone`].
//!
//! An event channel does not itself tell us that the peer domain died (Xen drops events
//! to a closed port silently); pair it with an unmap notification or a xenstore watch on
//! the peer's state for that.

use crate::error::XenError;
use crate::evtchn::EventChannel;
use idm_core::notify::{Notifier, NotifyError, WaitOutcome, WaitToken, Waiter};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What [`EvtchnDoorbell`] needs from an event channel; implemented by [`EventChannel`]
/// and by test doubles.
pub trait EventPort: Send + Sync {
    /// Signals the peer.
    fn notify(&self) -> Result<(), XenError>;
    /// Waits up to `timeout` for an event; true if one arrived (or spuriously).
    fn wait(&self, timeout: Option<Duration>) -> Result<bool, XenError>;
}

impl EventPort for EventChannel {
    fn notify(&self) -> Result<(), XenError> {
        EventChannel::notify(self)
    }
    fn wait(&self, timeout: Option<Duration>) -> Result<bool, XenError> {
        EventChannel::wait(self, timeout)
    }
}

#[derive(Debug, Default)]
struct State {
    /// Events received so far (wrapping).
    seen: u32,
    /// Whether some thread is blocked on the port.
    polling: bool,
}

/// A doorbell over one event channel.
#[derive(Debug)]
pub struct EvtchnDoorbell<P = EventChannel> {
    port: P,
    state: Mutex<State>,
    changed: Condvar,
}

impl<P: EventPort> EvtchnDoorbell<P> {
    /// Wraps a bound channel.
    pub fn new(port: P) -> Self {
        EvtchnDoorbell { port, state: Mutex::new(State::default()), changed: Condvar::new() }
    }

    /// The channel.
    pub fn port(&self) -> &P {
        &self.port
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two plain fields, valid even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn notify_error(e: XenError) -> NotifyError {
    match e {
        XenError::ChannelClosed { .. } => NotifyError::PeerGone,
        e => NotifyError::Os(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

impl<P: EventPort> Notifier for EvtchnDoorbell<P> {
    fn notify(&self) -> Result<(), NotifyError> {
        self.port.notify().map_err(notify_error)
    }
}

impl<P: EventPort> Waiter for EvtchnDoorbell<P> {
    fn arm(&self) -> WaitToken {
        WaitToken(self.lock().seen)
    }

    fn wait(&self, token: WaitToken, timeout: Option<Duration>) -> Result<WaitOutcome, NotifyError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        loop {
            if st.seen != token.0 {
                return Ok(WaitOutcome::Woken);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if !st.polling {
                st.polling = true;
                drop(st);
                let r = self.port.wait(left);
                st = self.lock();
                st.polling = false;
                if let Ok(true) = r {
                    st.seen = st.seen.wrapping_add(1);
                }
                self.changed.notify_all();
                return match r {
                    Ok(true) => Ok(WaitOutcome::Woken),
                    Ok(false) => Ok(WaitOutcome::TimedOut),
                    Err(e) => Err(notify_error(e)),
                };
            }
            if left == Some(Duration::ZERO) {
                return Ok(WaitOutcome::TimedOut);
            }
            // Another thread polls; it wakes us when it returns, with or without an event.
            st = match left {
                None => self.changed.wait(st).unwrap_or_else(PoisonError::into_inner),
                Some(l) => self.changed.wait_timeout(st, l).unwrap_or_else(PoisonError::into_inner).0,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{poll_readable, PollResult};
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    /// A port over a socket pair: notify writes a byte to the peer, wait reads one.
    struct SocketPort(UnixStream);

    impl EventPort for SocketPort {
        fn notify(&self) -> Result<(), XenError> {
            (&self.0).write_all(b"!").map_err(|source| XenError::Os { op: "test notify", source })
        }
        fn wait(&self, timeout: Option<Duration>) -> Result<bool, XenError> {
            match poll_readable(self.0.as_fd(), timeout) {
                Ok(PollResult::TimedOut) => Ok(false),
                Ok(PollResult::Readable) => match (&self.0).read(&mut [0u8; 1]) {
                    Ok(1) => Ok(true),
                    _ => Err(XenError::ChannelClosed { port: 0 }),
                },
                _ => Err(XenError::ChannelClosed { port: 0 }),
            }
        }
    }

    fn pair() -> (EvtchnDoorbell<SocketPort>, EvtchnDoorbell<SocketPort>) {
        let (a, b) = UnixStream::pair().unwrap();
        (EvtchnDoorbell::new(SocketPort(a)), EvtchnDoorbell::new(SocketPort(b)))
    }

    #[test]
    fn notify_wakes_and_timeout_times_out() {
        let (a, b) = pair();
        let t = b.arm();
        assert_eq!(b.wait(t, Some(Duration::from_millis(5))), Ok(WaitOutcome::TimedOut));
        a.notify().unwrap();
        assert_eq!(b.wait(t, None), Ok(WaitOutcome::Woken));
        // The count moved, so a wait with the old token returns at once.
        assert_ne!(b.arm(), t);
        assert_eq!(b.wait(t, Some(Duration::ZERO)), Ok(WaitOutcome::Woken));
        // A zero timeout still collects an event that is already pending.
        let t = b.arm();
        a.notify().unwrap();
        assert_eq!(b.wait(t, Some(Duration::ZERO)), Ok(WaitOutcome::Woken));
    }

    #[test]
    fn an_event_wakes_every_armed_waiter() {
        let (a, b) = pair();
        let b = Arc::new(b);
        let t = b.arm();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || b.wait(t, Some(Duration::from_secs(20))))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        a.notify().unwrap();
        for th in threads {
            assert_eq!(th.join().unwrap(), Ok(WaitOutcome::Woken));
        }
    }

    #[test]
    fn closed_channel_is_peer_gone() {
        let (a, b) = pair();
        drop(a);
        let t = b.arm();
        assert_eq!(b.wait(t, Some(Duration::from_secs(5))), Err(NotifyError::PeerGone));
    }
}
