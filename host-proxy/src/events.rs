//! Per-zone events: what happened to each zone, for operators (`host-proxy events`).
//!
//! The daemon keeps the last [`CAPACITY`] events in memory (older ones fall off: memory is
//! fixed whatever guests do) and sends them with its admin report, one `event {json}` line
//! each. Events come from the control plane only — a session started or ended, a session
//! refused by a limit, a guest domain gone, an MPS server gone, a CUDA IPC open refused by
//! the policy, a fault seen in a zone's statistics — never from the request path.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Mutex;

/// How many events the daemon keeps.
pub const CAPACITY: usize = 512;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A session's worker started.
    SessionStarted,
    /// A session ended as its guest left (the worker exited cleanly).
    SessionEnded,
    /// A session ended any other way (killed, crashed, refused by its worker).
    SessionFailed,
    /// A session was refused by a limit of its zone.
    SessionRefused,
    /// A guest domain vanished: its worker was killed.
    DomainGone,
    /// The zone's MPS server is gone: its sessions were ended.
    MpsEnded,
    /// A CUDA IPC open by the zone was refused by the sharing-group policy.
    IpcRefused,
    /// A reply of one of the zone's sessions carried a fault code (the context is lost).
    Fault,
}

impl Kind {
    /// The kebab-case name (as in JSON).
    pub fn name(self) -> &'static str {
        match self {
            Kind::SessionStarted => "session-started",
            Kind::SessionEnded => "session-ended",
            Kind::SessionFailed => "session-failed",
            Kind::SessionRefused => "session-refused",
            Kind::DomainGone => "domain-gone",
            Kind::MpsEnded => "mps-ended",
            Kind::IpcRefused => "ipc-refused",
            Kind::Fault => "fault",
        }
    }
}

/// One event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Its number: increasing, never reused while the daemon runs (a gap says events fell
    /// off between two reads).
    pub seq: u64,
    /// When, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// The zone's name.
    pub zone: String,
    /// What happened.
    pub kind: Kind,
    /// The daemon's session number, where one session is concerned.
    pub session: Option<u32>,
    /// What an operator needs to know about it, in words.
    pub detail: String,
}

/// The daemon's bounded event log.
#[derive(Debug, Default)]
pub struct Events {
    inner: Mutex<Log>,
}

#[derive(Debug, Default)]
struct Log {
    next: u64,
    events: VecDeque<Event>,
}

impl Events {
    /// Records an event now.
    pub fn push(&self, zone: &str, kind: Kind, session: Option<u32>, detail: impl Into<String>) {
        self.push_at(crate::ledger::unix_ms_now(), zone, kind, session, detail.into());
    }

    /// Records an event that happened at `unix_ms`. The tests call it with a fixed time:
    /// under Miri's isolation there is no wall clock to read.
    fn push_at(&self, unix_ms: u64, zone: &str, kind: Kind, session: Option<u32>, detail: String) {
        // The daemon logs each of these where it happens; the event is for operators.
        tracing::debug!(zone, event = kind.name(), session, %detail, "zone event");
        let mut log = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        log.next += 1;
        let seq = log.next;
        if log.events.len() == CAPACITY {
            log.events.pop_front();
        }
        log.events.push_back(Event { seq, unix_ms, zone: zone.to_owned(), kind, session, detail });
    }

    /// The events kept, oldest first.
    pub fn recent(&self) -> Vec<Event> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).events.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_the_last_events_in_order_and_numbers_them() {
        let e = Events::default();
        for i in 0..CAPACITY + 3 {
            e.push_at(1_000 + i as u64, "a", Kind::SessionStarted, Some(i as u32), format!("#{i}"));
        }
        let kept = e.recent();
        assert_eq!(kept.len(), CAPACITY);
        assert_eq!(kept[0].seq, 4, "the three oldest fell off");
        assert_eq!(kept[0].detail, "#3");
        assert!(kept.windows(2).all(|w| w[1].seq == w[0].seq + 1));
        assert_eq!(kept.last().unwrap().session, Some(CAPACITY as u32 + 2));
    }

    #[test]
    fn an_event_travels_as_one_json_line() {
        let e = Events::default();
        e.push_at(1_000, "zone a", Kind::IpcRefused, Some(7), "opened an export of zone \"b\"\nno group".into());
        let line = serde_json::to_string(&e.recent()[0]).unwrap();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("\"kind\":\"ipc-refused\""), "{line}");
        let back: Event = serde_json::from_str(&line).unwrap();
        assert_eq!(back, e.recent()[0]);
    }
}
