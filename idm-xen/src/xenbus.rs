//! Xen's split-driver handshake states (`xen/include/public/io/xenbus.h`), kept as a
//! decimal number in each side's `state` node, and helpers to set, read and await them.

use crate::xenstore::{XenStore, XsError};
use std::fmt;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// A frontend's or backend's `state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum XenbusState {
    /// 0: not set (also what a missing node means).
    Unknown = 0,
    /// 1: setting up.
    Initialising = 1,
    /// 2: waiting for the peer's details (a backend publishes its features first).
    InitWait = 2,
    /// 3: our details (ring refs, event channel) are published.
    Initialised = 3,
    /// 4: connected; the rings are live.
    Connected = 4,
    /// 5: shutting down.
    Closing = 5,
    /// 6: closed.
    Closed = 6,
    /// 7: reconfiguring.
    Reconfiguring = 7,
    /// 8: reconfigured.
    Reconfigured = 8,
}

impl XenbusState {
    const ALL: [XenbusState; 9] = [
        XenbusState::Unknown,
        XenbusState::Initialising,
        XenbusState::InitWait,
        XenbusState::Initialised,
        XenbusState::Connected,
        XenbusState::Closing,
        XenbusState::Closed,
        XenbusState::Reconfiguring,
        XenbusState::Reconfigured,
    ];

    /// The state numbered `n`.
    pub fn from_number(n: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(n).ok()?).copied()
    }

    /// Parses the decimal text of a `state` node (surrounding whitespace allowed).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Self::from_number(s.parse().ok()?)
    }
}

impl fmt::Display for XenbusState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", *self as u32)
    }
}

/// Writes `state` to `dir/state`.
pub fn set_state<S: Read + Write + AsFd>(xs: &mut XenStore<S>, dir: &str, state: XenbusState) -> Result<(), XsError> {
    xs.write(&format!("{dir}/state"), state.to_string().as_bytes())
}

/// Reads `dir/state`; `None` if the node does not exist.
pub fn read_state<S: Read + Write + AsFd>(xs: &mut XenStore<S>, dir: &str) -> Result<Option<XenbusState>, XsError> {
    let path = format!("{dir}/state");
    let Some(v) = xs.read(&path)? else { return Ok(None) };
    let text = std::str::from_utf8(&v).ok();
    match text.and_then(XenbusState::parse) {
        Some(s) => Ok(Some(s)),
        None => {
            Err(XsError::BadValue { path, detail: format!("not a XenbusState: {:?}", String::from_utf8_lossy(&v)) })
        }
    }
}

/// Waits until `dir/state` satisfies `wanted` (a missing node counts as
/// [`XenbusState::Unknown`]) and returns that state, or fails with
/// [`XsError::TimedOut`] after `timeout`. Uses a watch on `dir/state`, removed before
/// returning; other watches' events stay queued.
pub fn wait_for_state<S: Read + Write + AsFd>(
    xs: &mut XenStore<S>,
    dir: &str,
    wanted: impl Fn(XenbusState) -> bool,
    timeout: Duration,
) -> Result<XenbusState, XsError> {
    let path = format!("{dir}/state");
    let token = format!("idm-xen-wait:{path}");
    let deadline = Instant::now() + timeout;
    xs.watch(&path, &token)?;
    let result = wait_loop(xs, dir, &token, &wanted, deadline);
    // Best effort: a broken connection has no watches left to remove anyway.
    let _ = xs.unwatch(&path, &token);
    xs.discard_watch_events(&token);
    result
}

fn wait_loop<S: Read + Write + AsFd>(
    xs: &mut XenStore<S>,
    dir: &str,
    token: &str,
    wanted: &impl Fn(XenbusState) -> bool,
    deadline: Instant,
) -> Result<XenbusState, XsError> {
    // Each pass reads once and then waits for an event or the deadline, so the loop ends
    // by the deadline however many events the peer causes.
    loop {
        let state = read_state(xs, dir)?.unwrap_or(XenbusState::Unknown);
        if wanted(state) {
            return Ok(state);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(XsError::TimedOut);
        }
        xs.next_watch_event_for(token, Some(left))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_parse_and_format() {
        for (n, s) in XenbusState::ALL.iter().enumerate() {
            assert_eq!(s.to_string(), n.to_string());
            assert_eq!(XenbusState::parse(&n.to_string()), Some(*s));
        }
        assert_eq!(XenbusState::parse(" 4\n"), Some(XenbusState::Connected));
        for bad in ["", "9", "-1", "+4", "4a", "0x4", "00000004", "99999999999999999999"] {
            assert_eq!(XenbusState::parse(bad), None, "{bad:?}");
        }
        assert_eq!(XenbusState::from_number(u32::MAX), None);
    }
}

#[cfg(test)]
mod wait_tests {
    use super::*;
    use crate::xenstore::fake::{connect, Fake};

    #[test]
    fn wait_for_state_follows_the_watch() {
        let mut fake = Fake::default();
        fake.nodes.insert("/be/state".into(), b"2".to_vec());
        fake.advance = Some(("/be/state".into(), b"4".to_vec()));
        let mut xs = connect(fake);
        xs.watch("/unrelated", "mine").unwrap();
        let s = wait_for_state(&mut xs, "/be", |s| s == XenbusState::Connected, Duration::from_secs(10)).unwrap();
        assert_eq!(s, XenbusState::Connected);
        // Another watch's event survives the wait; the wait's own are gone.
        assert_eq!(xs.next_watch_event(Some(Duration::ZERO)).unwrap().unwrap().token, "mine");
        assert_eq!(xs.next_watch_event(Some(Duration::from_millis(10))).unwrap(), None);
    }

    #[test]
    fn wait_for_state_times_out_and_rejects_garbage() {
        let mut xs = connect(Fake::default());
        set_state(&mut xs, "/fe", XenbusState::Initialising).unwrap();
        assert_eq!(read_state(&mut xs, "/fe").unwrap(), Some(XenbusState::Initialising));
        assert_eq!(read_state(&mut xs, "/none").unwrap(), None);
        let e = wait_for_state(&mut xs, "/fe", |s| s == XenbusState::Connected, Duration::from_millis(30));
        assert!(matches!(e, Err(XsError::TimedOut)), "{e:?}");
        xs.write("/fe/state", b"connected").unwrap();
        assert!(matches!(read_state(&mut xs, "/fe"), Err(XsError::BadValue { .. })));
        // Unknown counts for a missing node.
        let s = wait_for_state(&mut xs, "/none", |s| s == XenbusState::Unknown, Duration::ZERO).unwrap();
        assert_eq!(s, XenbusState::Unknown);
    }
}
