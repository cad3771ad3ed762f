//! Notification between the two sides, behind transport-neutral traits.
//!
//! A Xen event channel, a futex word in shared memory and an eventfd all fit the same
//! shape: one side *notifies*; the other *arms* (takes a token describing "what I have
//! seen so far"), re-checks its condition, then *waits* for a notification newer than the
//! token. Arming before the re-check closes the lost-wake-up window.
//!
//! [`wait_until`] is the bounded spin-then-block loop every blocking operation uses: spin
//! on the condition for a bounded number of iterations (cheap when the peer answers in
//! well under a microsecond), then ask the peer for a notification and block, with an
//! optional timeout.

use core::time::Duration;

/// Why a notification could not be sent or awaited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum NotifyError {
    /// The peer is gone (domain died, process exited, event channel closed).
    PeerGone,
    /// The operating system refused the operation; the value is its error number.
    Os(i32),
}

impl core::fmt::Display for NotifyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            NotifyError::PeerGone => write!(f, "peer is gone"),
            NotifyError::Os(e) => write!(f, "notification failed with OS error {e}"),
        }
    }
}

impl core::error::Error for NotifyError {}

/// Sends a notification to the peer.
pub trait Notifier {
    /// Wakes the peer if it is waiting (or makes its next wait return at once).
    fn notify(&self) -> Result<(), NotifyError>;
}

/// What a waiter has seen so far; opaque to everything but its [`Waiter`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitToken(pub u32);

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// A notification newer than the token arrived (or the wait woke spuriously).
    Woken,
    /// The timeout passed first.
    TimedOut,
}

/// Waits for notifications from the peer.
pub trait Waiter {
    /// Takes a token before the final re-check of the condition.
    fn arm(&self) -> WaitToken;
    /// Blocks until a notification newer than `token`, or the timeout.
    fn wait(&self, token: WaitToken, timeout: Option<Duration>) -> Result<WaitOutcome, NotifyError>;
}

impl<T: Notifier + ?Sized> Notifier for &T {
    fn notify(&self) -> Result<(), NotifyError> {
        (**self).notify()
    }
}

impl<T: Waiter + ?Sized> Waiter for &T {
    fn arm(&self) -> WaitToken {
        (**self).arm()
    }
    fn wait(&self, token: WaitToken, timeout: Option<Duration>) -> Result<WaitOutcome, NotifyError> {
        (**self).wait(token, timeout)
    }
}

/// How long to spin before blocking, and how long to block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitPolicy {
    /// Condition checks before blocking (each is a few nanoseconds).
    pub spin_iters: u32,
    /// Longest single block; `None` blocks until notified (the transport must then report
    /// a dead peer through [`NotifyError::PeerGone`]).
    pub timeout: Option<Duration>,
}

impl Default for WaitPolicy {
    fn default() -> Self {
        // About 20–50 µs of spinning on current CPUs: longer than a GPU call's typical
        // turnaround, far shorter than a scheduler tick.
        WaitPolicy { spin_iters: 20_000, timeout: None }
    }
}

/// Outcome of [`wait_until`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitError<E> {
    /// The condition check itself failed.
    Check(E),
    /// The notification mechanism failed.
    Notify(NotifyError),
    /// The policy's timeout passed.
    TimedOut,
}

/// Spins on `ready` for `policy.spin_iters` checks, then blocks on `waiter` between checks.
/// `request` is called once per block, before the final re-check, to ask the peer for a
/// notification (set the ring's *wanted* word).
pub fn wait_until<W: Waiter, E>(
    waiter: &W,
    policy: &WaitPolicy,
    mut ready: impl FnMut() -> Result<bool, E>,
    mut request: impl FnMut(),
) -> Result<(), WaitError<E>> {
    for _ in 0..policy.spin_iters {
        if ready().map_err(WaitError::Check)? {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    loop {
        let token = waiter.arm();
        request();
        if ready().map_err(WaitError::Check)? {
            return Ok(());
        }
        match waiter.wait(token, policy.timeout).map_err(WaitError::Notify)? {
            WaitOutcome::Woken => {}
            WaitOutcome::TimedOut => {
                return if ready().map_err(WaitError::Check)? { Ok(()) } else { Err(WaitError::TimedOut) };
            }
        }
    }
}

/// A waiter and notifier that do nothing: for transports where both sides poll, and for
/// tests. Its `wait` returns at once, so [`wait_until`] degenerates into polling.
#[derive(Clone, Copy, Debug, Default)]
pub struct Polling;

impl Notifier for Polling {
    fn notify(&self) -> Result<(), NotifyError> {
        Ok(())
    }
}

impl Waiter for Polling {
    fn arm(&self) -> WaitToken {
        WaitToken(0)
    }
    fn wait(&self, _token: WaitToken, _timeout: Option<Duration>) -> Result<WaitOutcome, NotifyError> {
        core::hint::spin_loop();
        Ok(WaitOutcome::Woken)
    }
}
