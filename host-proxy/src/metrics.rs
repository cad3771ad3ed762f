//! Prometheus metrics of the daemon (`metrics_listen` in the configuration; off when
//! absent), in the text exposition format (the `prometheus-client` crate), on `GET /metrics`.
//!
//! Nothing here is on a request's path: each worker publishes its session's usage and
//! request counters in its zone's ledger (a few stores into its own cache line per request,
//! [`crate::ledger`]); the daemon keeps its own counters (sessions started, ended, refused)
//! and the IPC broker its decisions; a scrape reads them all and encodes them. Memory is
//! bounded by the number of zones (labels are zone names from the configuration or the
//! peer, never anything a guest sends).

use crate::ledger::Counts;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The daemon's own counters.
#[derive(Debug, Default)]
pub struct DaemonCounters {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    started: u64,
    ended: u64,
    /// By (zone, limit).
    refused: BTreeMap<(String, &'static str), u64>,
    /// Request counters of the sessions that ended, by zone.
    retired: BTreeMap<String, Counts>,
}

impl DaemonCounters {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A session's worker was spawned.
    pub fn started(&self) {
        self.with(|i| i.started += 1);
    }

    /// A session ended; `counts` are its last request counters.
    pub fn ended(&self, zone: &str, counts: Counts) {
        self.with(|i| {
            i.ended += 1;
            let r = i.retired.entry(zone.to_owned()).or_default();
            r.requests += counts.requests;
            r.errors += counts.errors;
        });
    }

    /// A session of `zone` was refused for `limit` (`max_sessions`, `memory`).
    pub fn refused(&self, zone: &str, limit: &'static str) {
        self.with(|i| *i.refused.entry((zone.to_owned(), limit)).or_default() += 1);
    }
}

/// What a scrape reports about one zone with live sessions.
#[derive(Debug, Default)]
pub struct ZoneNow {
    /// Sessions holding a ledger slot.
    pub sessions: u32,
    /// Device memory charged.
    pub mem_used: u64,
    /// The memory quota.
    pub mem_quota: u64,
    /// Live objects.
    pub objects: u64,
    /// Request counters of the live sessions.
    pub counts: Counts,
}

type Labels = Vec<(String, String)>;

fn zone(z: &str) -> Labels {
    vec![("zone".into(), z.into())]
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The text exposition of the daemon's metrics: `zones` are the zones with live sessions;
/// `opens` the broker's IPC decisions (zone, granted, refused); `mps` the MPS servers running.
pub fn render(
    zones: &BTreeMap<String, ZoneNow>,
    counters: &DaemonCounters,
    opens: &[(String, u64, u64)],
    mps: usize,
) -> String {
    let mut reg = <Registry>::with_prefix("vgpu");
    let used = Family::<Labels, Gauge>::default();
    let quota = Family::<Labels, Gauge>::default();
    let sessions = Family::<Labels, Gauge>::default();
    let objects = Family::<Labels, Gauge>::default();
    let requests = Family::<Labels, Counter>::default();
    let errors = Family::<Labels, Counter>::default();
    let refused = Family::<Labels, Counter>::default();
    let ipc = Family::<Labels, Counter>::default();
    let (started, ended, mps_servers) = (Counter::<u64>::default(), Counter::<u64>::default(), Gauge::<i64>::default());
    for (name, z) in zones {
        used.get_or_create(&zone(name)).set(gauge(z.mem_used));
        quota.get_or_create(&zone(name)).set(gauge(z.mem_quota));
        sessions.get_or_create(&zone(name)).set(i64::from(z.sessions));
        objects.get_or_create(&zone(name)).set(gauge(z.objects));
    }
    counters.with(|i| {
        started.inc_by(i.started);
        ended.inc_by(i.ended);
        let mut totals: BTreeMap<&str, Counts> = i.retired.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        for (name, z) in zones {
            let t = totals.entry(name.as_str()).or_default();
            t.requests += z.counts.requests;
            t.errors += z.counts.errors;
        }
        for (name, t) in totals {
            requests.get_or_create(&zone(name)).inc_by(t.requests);
            errors.get_or_create(&zone(name)).inc_by(t.errors);
        }
        for ((name, limit), n) in &i.refused {
            let mut l = zone(name);
            l.push(("limit".into(), (*limit).into()));
            refused.get_or_create(&l).inc_by(*n);
        }
    });
    for (name, granted, denied) in opens {
        for (result, n) in [("granted", granted), ("refused", denied)] {
            let mut l = zone(name);
            l.push(("result".into(), result.into()));
            ipc.get_or_create(&l).inc_by(*n);
        }
    }
    mps_servers.set(i64::try_from(mps).unwrap_or(i64::MAX));
    reg.register(
        "zone_memory_used_bytes",
        "Device memory charged to the zone over all its sessions (allocations, physical memory, free caches, contexts)",
        used,
    );
    reg.register("zone_memory_quota_bytes", "The zone's memory quota", quota);
    reg.register("zone_sessions", "Sessions (CUDA processes) of the zone", sessions);
    reg.register("zone_objects", "Live objects of the zone (counted against max_handles)", objects);
    reg.register("zone_requests", "Requests the zone's sessions sent", requests);
    reg.register("zone_request_errors", "Requests of the zone answered with a CUDA error", errors);
    reg.register("zone_sessions_refused", "Sessions refused at attach, by the limit that refused them", refused);
    reg.register("zone_ipc_opens", "CUDA IPC opens by the zone, granted or refused by the sharing-group policy", ipc);
    reg.register("sessions_started", "Session workers started", started);
    reg.register("sessions_ended", "Session workers ended", ended);
    reg.register(
        "mps_servers",
        "MPS control daemons running (one per sharing = \"mps\" group with sessions)",
        mps_servers,
    );
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

/// Metrics connections served at once (more are closed at once).
pub const MAX_SCRAPES: usize = 16;

/// Longest request head accepted.
const MAX_HEAD: usize = 8 << 10;

/// Answers one HTTP connection: `GET /metrics` with `body()`, anything else 404.
pub async fn answer(mut stream: tokio::net::TcpStream, body: impl FnOnce() -> String) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), read).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
    let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let ok = first.starts_with(b"GET /metrics ") || first.starts_with(b"GET /metrics\r");
    let (status, ctype, text) = if ok {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body())
    } else {
        ("404 Not Found", "text/plain; charset=utf-8", "only GET /metrics is served here\n".to_owned())
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zones_counters_and_decisions_are_rendered() {
        let c = DaemonCounters::default();
        c.started();
        c.started();
        c.ended("a", Counts { requests: 10, errors: 1 });
        c.refused("a", "max_sessions");
        let mut zones = BTreeMap::new();
        zones.insert(
            "a".to_owned(),
            ZoneNow {
                sessions: 1,
                mem_used: 4096,
                mem_quota: 1 << 20,
                objects: 2,
                counts: Counts { requests: 5, errors: 0 },
            },
        );
        let text = render(&zones, &c, &[("a".into(), 3, 1)], 0);
        for line in [
            "vgpu_zone_memory_used_bytes{zone=\"a\"} 4096",
            "vgpu_zone_memory_quota_bytes{zone=\"a\"} 1048576",
            "vgpu_zone_sessions{zone=\"a\"} 1",
            "vgpu_zone_requests_total{zone=\"a\"} 15",
            "vgpu_zone_request_errors_total{zone=\"a\"} 1",
            "vgpu_zone_sessions_refused_total{zone=\"a\",limit=\"max_sessions\"} 1",
            "vgpu_zone_ipc_opens_total{zone=\"a\",result=\"refused\"} 1",
            "vgpu_sessions_started_total 2",
            "vgpu_sessions_ended_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
