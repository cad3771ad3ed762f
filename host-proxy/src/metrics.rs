//! Prometheus metrics of the daemon (`metrics_listen` in the configuration; off when
//! absent), in the text exposition format (the `prometheus-client` crate), on `GET /metrics`.
//!
//! Nothing here is on a request's path: each worker publishes its session's usage and
//! request counters in its zone's ledger (a few stores into its own cache line per request,
//! [`crate::ledger`]); the daemon keeps its own counters (sessions started, ended, refused)
//! and the IPC broker its decisions; a scrape reads them all and encodes them. Memory is
//! bounded by the number of zones (labels are zone names from the configuration or the
//! peer, never anything a guest sends).

use crate::ledger::{Tally, BUCKET_BOUNDS_NS};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
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
    /// Statistics of the sessions that ended, by zone.
    retired: BTreeMap<String, Tally>,
}

impl DaemonCounters {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A session's worker was spawned.
    pub fn started(&self) {
        self.with(|i| i.started += 1);
    }

    /// A session ended; `tally` is what it did.
    pub fn ended(&self, zone: &str, tally: &Tally) {
        self.with(|i| {
            i.ended += 1;
            i.retired.entry(zone.to_owned()).or_default().add(tally);
        });
    }

    /// What zone `name`'s ended sessions did, added to `live` (its live sessions').
    pub fn total(&self, name: &str, live: &Tally) -> Tally {
        self.with(|i| {
            let mut t = i.retired.get(name).cloned().unwrap_or_default();
            t.add(live);
            t
        })
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
    /// Of `mem_used`, what the sessions' contexts take.
    pub context_bytes: u64,
    /// Statistics of the live sessions.
    pub tally: Tally,
}

/// The GPU the daemon serves.
#[derive(Debug, Default)]
pub struct GpuNow {
    /// Its CUDA ordinal (the `gpu` label).
    pub device: i32,
    /// Total and used memory as the driver reports it (NVML), where it can be asked.
    pub driver: Option<(u64, u64)>,
}

/// Xen toolstack counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct XenNow {
    /// Device slots offered to guests (first offers and offers again after a reset).
    pub offered: u64,
    /// Slots a guest connected to (a worker was started for it).
    pub claimed: u64,
    /// Slots reset after their worker ended, offered again (worker restarts).
    pub restarts: u64,
    /// Of those, resets delayed by a back-off because the worker failed.
    pub backoffs: u64,
}

/// Histograms counted elsewhere (in the workers' ledgers): labels, sum in seconds, count,
/// buckets (upper bound in seconds, non-cumulative count; the last `+Inf`).
#[derive(Debug, Default)]
struct Histograms(Vec<(Labels, f64, u64, Buckets)>);

/// (upper bound in seconds, count) per bucket.
type Buckets = Vec<(f64, u64)>;

impl TypedMetric for Histograms {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histograms {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, sum, count, buckets) in &self.0 {
            encoder.encode_family(labels)?.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

type Labels = Vec<(String, String)>;

fn zone(z: &str) -> Labels {
    vec![("zone".into(), z.into())]
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// What a scrape reports besides the zones: the broker's IPC decisions (zone, granted,
/// refused), the MPS servers running, the GPU, the Xen toolstack (when Xen is served).
#[derive(Debug, Default)]
pub struct Plant {
    /// IPC opens: (zone, granted, refused).
    pub opens: Vec<(String, u64, u64)>,
    /// MPS control daemons running.
    pub mps: usize,
    /// The GPU.
    pub gpu: GpuNow,
    /// The Xen toolstack's counters.
    pub xen: Option<XenNow>,
}

/// The text exposition of the daemon's metrics: `zones` are the zones with live sessions.
pub fn render(zones: &BTreeMap<String, ZoneNow>, counters: &DaemonCounters, plant: &Plant) -> String {
    let mut reg = <Registry>::with_prefix("vgpu");
    let used = Family::<Labels, Gauge>::default();
    let quota = Family::<Labels, Gauge>::default();
    let sessions = Family::<Labels, Gauge>::default();
    let objects = Family::<Labels, Gauge>::default();
    let requests = Family::<Labels, Counter>::default();
    let errors = Family::<Labels, Counter>::default();
    let refused = Family::<Labels, Counter>::default();
    let ipc = Family::<Labels, Counter>::default();
    let faults = Family::<Labels, Counter>::default();
    let by_error = Family::<Labels, Counter>::default();
    let mut service = Histograms::default();
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
        let mut totals: BTreeMap<&str, Tally> = i.retired.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        for (name, z) in zones {
            totals.entry(name.as_str()).or_default().add(&z.tally);
        }
        for (name, t) in totals {
            requests.get_or_create(&zone(name)).inc_by(t.counts.requests);
            errors.get_or_create(&zone(name)).inc_by(t.counts.errors);
            faults.get_or_create(&zone(name)).inc_by(t.faults());
            for (error, n) in t.errors() {
                let mut l = zone(name);
                l.push(("error".into(), error.into()));
                by_error.get_or_create(&l).inc_by(n);
            }
            for k in t.kinds() {
                let mut l = zone(name);
                l.push(("request".into(), k.name.into()));
                let bounds = BUCKET_BOUNDS_NS.iter().map(|b| *b as f64 / 1e9).chain([f64::MAX]);
                let buckets = bounds.zip(k.buckets).collect();
                service.0.push((l, k.sum_ns as f64 / 1e9, k.count, buckets));
            }
        }
        for ((name, limit), n) in &i.refused {
            let mut l = zone(name);
            l.push(("limit".into(), (*limit).into()));
            refused.get_or_create(&l).inc_by(*n);
        }
    });
    for (name, granted, denied) in &plant.opens {
        for (result, n) in [("granted", granted), ("refused", denied)] {
            let mut l = zone(name);
            l.push(("result".into(), result.into()));
            ipc.get_or_create(&l).inc_by(*n);
        }
    }
    mps_servers.set(i64::try_from(plant.mps).unwrap_or(i64::MAX));
    let gpu = vec![("gpu".to_owned(), plant.gpu.device.to_string())];
    let gpu_gauge = |v: u64| {
        let f = Family::<Labels, Gauge>::default();
        f.get_or_create(&gpu).set(gauge(v));
        f
    };
    let zones_mem = zones.values().fold(0u64, |a, z| a.saturating_add(z.mem_used));
    let contexts_mem = zones.values().fold(0u64, |a, z| a.saturating_add(z.context_bytes));
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
    reg.register("zone_errors", "Requests of the zone answered with a CUDA error, by the error's name", by_error);
    reg.register(
        "zone_faults",
        "Kernel faults in the zone's contexts (a request answered with a fault code after one that was not)",
        faults,
    );
    reg.register(
        "zone_request_seconds",
        "Time the zone's worker took to serve a request, by request (the host's side: no transport)",
        service,
    );
    reg.register("zone_sessions_refused", "Sessions refused at attach, by the limit that refused them", refused);
    reg.register("zone_ipc_opens", "CUDA IPC opens by the zone, granted or refused by the sharing-group policy", ipc);
    reg.register("sessions_started", "Session workers started", started);
    reg.register("sessions_ended", "Session workers ended", ended);
    reg.register(
        "mps_servers",
        "MPS control daemons running (one per sharing = \"mps\" group with sessions)",
        mps_servers,
    );
    reg.register(
        "gpu_memory_zones_bytes",
        "Device memory charged to all zones (zone_memory_used_bytes summed)",
        gpu_gauge(zones_mem),
    );
    reg.register("gpu_memory_contexts_bytes", "Of that, what the zones' contexts take", gpu_gauge(contexts_mem));
    if let Some((total, used)) = plant.gpu.driver {
        reg.register(
            "gpu_memory_total_bytes",
            "Device memory in all, as the driver reports it (NVML)",
            gpu_gauge(total),
        );
        reg.register(
            "gpu_memory_used_bytes",
            "Device memory in use, as the driver reports it (NVML; every process on the GPU)",
            gpu_gauge(used),
        );
    }
    if let Some(x) = plant.xen {
        let counter = |v: u64| {
            let c = Counter::<u64>::default();
            c.inc_by(v);
            c
        };
        reg.register("xen_slots_offered", "Device slots offered to Xen guests", counter(x.offered));
        reg.register(
            "xen_slots_claimed",
            "Device slots a Xen guest connected to (a worker started)",
            counter(x.claimed),
        );
        reg.register("xen_worker_restarts", "Slots offered again after their worker ended", counter(x.restarts));
        reg.register(
            "xen_worker_backoffs",
            "Of those, offers delayed by a back-off after a failed worker",
            counter(x.backoffs),
        );
    }
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
        let mut done = Tally::default();
        done.counts = crate::ledger::Counts { requests: 10, errors: 1 };
        c.ended("a", &done);
        c.refused("a", "max_sessions");
        let mut session = crate::ledger::Ledger::private();
        let alloc = vgpu_proto::generated::REQUEST_IDS[0];
        session.record(alloc.0, 1_500, None);
        session.record(alloc.0, 4_000, Some(700));
        let mut live = session.tally();
        live.counts = crate::ledger::Counts { requests: 5, errors: 0 };
        let name = vgpu_proto::generated::request_name(alloc).unwrap();
        let mut zones = BTreeMap::new();
        zones.insert(
            "a".to_owned(),
            ZoneNow { sessions: 1, mem_used: 4096, mem_quota: 1 << 20, objects: 2, context_bytes: 1024, tally: live },
        );
        let plant = Plant {
            opens: vec![("a".into(), 3, 1)],
            gpu: GpuNow { device: 0, driver: Some((80 << 30, 1 << 30)) },
            xen: Some(XenNow { offered: 4, claimed: 2, restarts: 1, backoffs: 1 }),
            ..Plant::default()
        };
        let text = render(&zones, &c, &plant);
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
            "vgpu_gpu_memory_zones_bytes{gpu=\"0\"} 4096",
            "vgpu_gpu_memory_contexts_bytes{gpu=\"0\"} 1024",
            "vgpu_gpu_memory_total_bytes{gpu=\"0\"} 85899345920",
            "vgpu_xen_slots_claimed_total 2",
            "vgpu_xen_worker_backoffs_total 1",
            "vgpu_zone_faults_total{zone=\"a\"} 1",
            "vgpu_zone_errors_total{zone=\"a\",error=\"CUDA_ERROR_ILLEGAL_ADDRESS\"} 1",
            &format!("vgpu_zone_request_seconds_count{{zone=\"a\",request=\"{name}\"}} 2"),
            &format!("vgpu_zone_request_seconds_bucket{{le=\"0.000001\",zone=\"a\",request=\"{name}\"}} 0"),
            &format!("vgpu_zone_request_seconds_bucket{{le=\"0.000002\",zone=\"a\",request=\"{name}\"}} 1"),
            &format!("vgpu_zone_request_seconds_bucket{{le=\"0.000005\",zone=\"a\",request=\"{name}\"}} 2"),
            &format!("vgpu_zone_request_seconds_bucket{{le=\"+Inf\",zone=\"a\",request=\"{name}\"}} 2"),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
