//! `host-proxy status` and `host-proxy events`: what the running daemon serves, per zone,
//! and what happened to its zones, from its admin socket (`<socket>.admin`: one `key=value`
//! line per live session, the event log as `event {json}` lines, then `end`; see
//! `daemon::report`).

use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::Duration;

pub use crate::events::Event;

/// One zone as the daemon reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ZoneStatus {
    /// The zone's name.
    pub name: String,
    /// The peer uid (local transport) — 0 for a Xen guest.
    pub uid: u32,
    /// The Xen domain id, for a Xen guest.
    pub domid: Option<u16>,
    /// `isolated`, `mps` or `mig`.
    pub sharing: String,
    /// Sessions holding a slot of the zone's ledger.
    pub sessions: u32,
    /// Device memory charged to the zone (allocations, free caches, contexts…), in bytes.
    pub mem_used: u64,
    /// The zone's memory quota, in bytes.
    pub mem_quota: u64,
    /// Live objects of all its sessions.
    pub objects: u64,
    /// Seconds since its oldest live session started.
    pub uptime_s: u64,
    /// Requests its sessions sent (ended sessions included).
    pub requests: u64,
    /// Of those, answered with a CUDA error.
    pub errors: u64,
    /// Requests per second over the daemon's last one-second sample.
    pub requests_per_s: f64,
    /// The last error: its name, the request, how long ago.
    pub last_error: Option<LastError>,
    /// Its sessions.
    pub workers: Vec<SessionStatus>,
}

/// A zone's last error.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LastError {
    /// `CUDA_ERROR_…`.
    pub error: String,
    /// The request it answered.
    pub request: String,
    /// Seconds ago.
    pub ago_s: u64,
}

/// One session of a zone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct SessionStatus {
    /// The daemon's session number.
    pub session: u32,
    /// The worker's pid.
    pub worker_pid: Option<u32>,
    /// The guest process's pid (local transport).
    pub peer_pid: Option<i32>,
    /// Seconds since it started.
    pub uptime_s: u64,
}

/// Asks the daemon listening on `socket` for its zones.
pub fn query(socket: &Path) -> Result<Vec<ZoneStatus>> {
    report(socket).map(|lines| parse(&lines))
}

/// Asks the daemon listening on `socket` for its event log (oldest first).
pub fn query_events(socket: &Path) -> Result<Vec<Event>> {
    report(socket).map(|lines| parse_events(&lines))
}

/// The events of the report's `event` lines (a line that does not parse is left out).
pub fn parse_events(lines: &[String]) -> Vec<Event> {
    lines.iter().filter_map(|l| l.strip_prefix("event ")).filter_map(|j| serde_json::from_str(j).ok()).collect()
}

/// The admin report's lines, without its `end`.
fn report(socket: &Path) -> Result<Vec<String>> {
    let admin = crate::daemon::admin_socket_path(socket);
    let stream = std::os::unix::net::UnixStream::connect(&admin).with_context(|| {
        format!("no host-proxy is running on {} (cannot connect to {})", socket.display(), admin.display())
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut lines = Vec::new();
    for line in BufReader::new(stream).lines() {
        let line = line.context("the daemon's report broke off")?;
        if line == "end" {
            return Ok(lines);
        }
        lines.push(line);
    }
    anyhow::bail!("the daemon's report ended without its last line")
}

/// Groups the report's session lines by zone.
pub fn parse(lines: &[String]) -> Vec<ZoneStatus> {
    let mut zones: BTreeMap<String, ZoneStatus> = BTreeMap::new();
    for line in lines {
        let mut words = line.split_whitespace();
        if words.next() != Some("zone") {
            continue;
        }
        let session = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        let kv: BTreeMap<&str, &str> = words.filter_map(|w| w.split_once('=')).collect();
        let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok());
        let Some(name) = kv.get("name") else { continue };
        let z = zones
            .entry((*name).to_owned())
            .or_insert_with(|| ZoneStatus { name: (*name).to_owned(), ..Default::default() });
        z.uid = num("uid").and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
        z.domid = num("domid").and_then(|v| u16::try_from(v).ok());
        z.sharing = kv.get("sharing").copied().unwrap_or("isolated").to_owned();
        z.sessions = num("zone_sessions").and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
        z.mem_used = num("zone_mem_used").unwrap_or(0);
        z.mem_quota = num("mem_quota").unwrap_or(0);
        z.objects = num("zone_objects").unwrap_or(0);
        z.requests = num("requests").unwrap_or(0);
        z.errors = num("errors").unwrap_or(0);
        z.requests_per_s = kv.get("rps").and_then(|v| v.parse().ok()).unwrap_or(0.0);
        z.last_error = kv.get("last_error").and_then(|v| {
            let mut p = v.splitn(3, '/');
            let (error, request, ago) = (p.next()?, p.next()?, p.next()?.parse().ok()?);
            Some(LastError { error: error.to_owned(), request: request.to_owned(), ago_s: ago })
        });
        let uptime = num("uptime_s").unwrap_or(0);
        z.uptime_s = z.uptime_s.max(uptime);
        z.workers.push(SessionStatus {
            session,
            worker_pid: num("worker_pid").and_then(|v| u32::try_from(v).ok()),
            peer_pid: kv.get("peer_pid").and_then(|v| v.parse().ok()),
            uptime_s: uptime,
        });
    }
    zones.into_values().collect()
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn duration(s: u64) -> String {
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// A table like nvidia-smi's process list: one row per zone, its sessions below it.
pub fn table(zones: &[ZoneStatus]) -> String {
    if zones.is_empty() {
        return "no zones: host-proxy runs and serves no session\n".to_owned();
    }
    let mut t = format!(
        "{:<20} {:<12} {:<9} {:>8} {:>27} {:>8} {:>9} {:>9}  {}\n",
        "ZONE", "UID/DOMAIN", "SHARING", "SESSIONS", "MEMORY USED / QUOTA", "OBJECTS", "REQ/S", "UPTIME", "LAST ERROR"
    );
    for z in zones {
        let who = match z.domid {
            Some(d) => format!("dom {d}"),
            None => format!("uid {}", z.uid),
        };
        let mem = format!("{} / {}", mib(z.mem_used), mib(z.mem_quota));
        let last = z
            .last_error
            .as_ref()
            .map_or_else(|| "-".to_owned(), |e| format!("{} ({}, {} ago)", e.error, e.request, duration(e.ago_s)));
        t.push_str(&format!(
            "{:<20} {:<12} {:<9} {:>8} {:>27} {:>8} {:>9.1} {:>9}  {last}\n",
            z.name,
            who,
            z.sharing,
            z.sessions,
            mem,
            z.objects,
            z.requests_per_s,
            duration(z.uptime_s)
        ));
        for w in &z.workers {
            let pid = |p: Option<String>| p.unwrap_or_else(|| "-".into());
            t.push_str(&format!(
                "  session {:<6} worker pid {:<8} guest pid {:<8} up {}\n",
                w.session,
                pid(w.worker_pid.map(|p| p.to_string())),
                pid(w.peer_pid.map(|p| p.to_string())),
                duration(w.uptime_s)
            ));
        }
    }
    t
}

/// The event log as a table, oldest first: time (UTC), zone, session, event, detail.
pub fn events_table(events: &[Event]) -> String {
    if events.is_empty() {
        return "no events: no session has started since host-proxy started\n".to_owned();
    }
    let mut t = format!("{:<23} {:<20} {:>7}  {:<16} {}\n", "TIME (UTC)", "ZONE", "SESSION", "EVENT", "DETAIL");
    for e in events {
        let session = e.session.map_or_else(|| "-".to_owned(), |s| s.to_string());
        t.push_str(&format!(
            "{:<23} {:<20} {:>7}  {:<16} {}\n",
            utc(e.unix_ms),
            e.zone,
            session,
            e.kind.name(),
            e.detail
        ));
    }
    t
}

/// The event log as JSON (`{"events": [...]}`).
pub fn events_json(events: &[Event]) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        events: &'a [Event],
    }
    let mut s = serde_json::to_string_pretty(&Out { events }).expect("plain data serialises");
    s.push('\n');
    s
}

/// `YYYY-MM-DD HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds (the proleptic
/// Gregorian calendar, days to civil date after Howard Hinnant's `civil_from_days`).
fn utc(unix_ms: u64) -> String {
    let (days, ms) = ((unix_ms / 86_400_000) as i64, unix_ms % 86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let s = ms / 1000;
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}", s / 3600, s / 60 % 60, s % 60, ms % 1000)
}

/// The zones as JSON (`{"zones": [...]}`).
pub fn json(zones: &[ZoneStatus]) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        zones: &'a [ZoneStatus],
    }
    let mut s = serde_json::to_string_pretty(&Out { zones }).expect("plain data serialises");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_render_with_utc_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000");
        assert_eq!(utc(1_796_255_999_999), "2026-12-02 23:59:59.999");
        let lines = [
            r#"event {"seq":1,"unix_ms":1796255999999,"zone":"a","kind":"session-refused","session":4,"detail":"max_sessions"}"#,
            "event {not json",
            "zone 3 name=a uid=1",
        ]
        .map(String::from);
        let e = parse_events(&lines);
        assert_eq!(e.len(), 1);
        let t = events_table(&e);
        assert!(t.contains("2026-12-02 23:59:59.999 a") && t.contains("session-refused  max_sessions"), "{t}");
        assert_eq!(parse(&lines).len(), 1, "status reads only the zone lines");
        assert!(events_table(&[]).starts_with("no events"));
    }

    #[test]
    fn sessions_are_grouped_by_zone() {
        let lines = [
            "zone 3 name=a uid=1000 peer_pid=77 worker_pid=78 domid=- sharing=mps uptime_s=65 zone_sessions=2 zone_mem_used=2097152 zone_objects=3 mem_quota=4194304 requests=90 errors=1 rps=12.5 last_error=CUDA_ERROR_OUT_OF_MEMORY/CuMemAllocV2/3",
            "zone 4 name=a uid=1000 peer_pid=79 worker_pid=80 domid=- sharing=mps uptime_s=5 zone_sessions=2 zone_mem_used=2097152 zone_objects=3 mem_quota=4194304 requests=90 errors=1 rps=12.5 last_error=CUDA_ERROR_OUT_OF_MEMORY/CuMemAllocV2/3",
            "zone 5 name=dom-g uid=0 peer_pid=- worker_pid=81 domid=7 sharing=isolated uptime_s=1 zone_sessions=1 zone_mem_used=0 zone_objects=0 mem_quota=1048576",
            "garbage line",
        ]
        .map(String::from);
        let z = parse(&lines);
        assert_eq!(z.len(), 2);
        assert_eq!((z[0].name.as_str(), z[0].sessions, z[0].workers.len(), z[0].uptime_s), ("a", 2, 2, 65));
        assert_eq!((z[0].mem_used, z[0].mem_quota, z[0].sharing.as_str()), (2 << 20, 4 << 20, "mps"));
        assert_eq!((z[1].domid, z[1].workers[0].peer_pid), (Some(7), None));
        assert_eq!((z[0].requests, z[0].errors, z[0].requests_per_s), (90, 1, 12.5));
        assert_eq!(z[1].last_error, None);
        let t = table(&z);
        assert!(t.contains("2.0 MiB / 4.0 MiB") && t.contains("dom 7") && t.contains("0:01:05"), "{t}");
        assert!(t.contains("12.5") && t.contains("CUDA_ERROR_OUT_OF_MEMORY (CuMemAllocV2, 0:00:03 ago)"), "{t}");
        let j: serde_json::Value = serde_json::from_str(&json(&z)).unwrap();
        assert_eq!(j["zones"][0]["workers"][1]["worker_pid"], 80);
        assert_eq!(table(&[]), "no zones: host-proxy runs and serves no session\n");
    }
}
