//! The per-zone worker: a synchronous request loop over the zone's idm channel.
//!
//! One worker process per zone owns that zone's CUDA contexts, so a fault, crash or hang of
//! one zone cannot reach another, and the process's exit releases all its GPU memory. The
//! loop does no async scheduling per call: it spins, then blocks on the doorbell.
//!
//! Each request is decoded from the private copy the channel made — [`Attach`] by hand,
//! every other request by the generated [`dispatch`] into the zone's [`Api`] implementation
//! ([`crate::zone::ZoneCtx`]) — handled inside `catch_unwind` (a bug triggered by one
//! request fails that request and ends that session, whose state may be half-updated;
//! never the host), and answered; asynchronous (posted)
//! requests' errors are deferred to the next reply. A channel error (a corrupt ring, a peer
//! that vanished) ends the loop: the zone is torn down. Before each request the zone applies
//! IPC revocations the daemon sent ([`Zone::poll_ipc`]), so no request reaches memory whose
//! exporter has freed it.
//!
//! [`Api`]: vgpu_proto::generated::Api

use crate::backend::GpuBackend;
use crate::device_output::DeviceOutput;
use crate::zone::Zone;
use idm_core::wire::decode_body;
use idm_core::wire::proto::ErrorKind;
use idm_core::{ChannelError, DataWindow, Incoming, Message, MessageId, Notifier, Server, SharedMemory, Waiter};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;
use vgpu_proto::generated::{
    dispatch, request_name, CtxDestroy, CuCtxSynchronize, CuEventSynchronize, CuLibraryUnload, CuModuleUnload,
    CuStreamSynchronize, DispatchError, MemcpyDtoH, PrimaryCtxReset, Responder,
};
use vgpu_proto::{code, Attach};

/// Everything a worker is told by the daemon that starts it, as one value (passed as TOML in
/// its one argument, `host-proxy worker --spec`): the zone, its quotas, the backend, the
/// transport's limits, and the descriptors it inherits.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    /// The daemon's number for this session.
    pub zone_id: u32,
    /// The zone's name.
    pub zone_name: String,
    /// The backend to open.
    pub backend: crate::config::BackendKind,
    /// The CUDA device ordinal.
    pub device: i32,
    /// The simulated GPU's memory, for `backend = "sim"`.
    pub sim_memory_bytes: u64,
    /// Largest ring the guest may offer, in bytes.
    pub max_ring_bytes: u64,
    /// Largest data window the guest may offer, in bytes.
    pub max_window_bytes: u64,
    /// Record per-request timings and log them when the session ends.
    pub profile_requests: bool,
    /// The inherited end of the daemon's IPC broker channel (none: IPC is not offered).
    pub broker_fd: Option<i32>,
    /// The zone's ledger (inherited memfd) and this session's slot in it (none: the session
    /// is its zone's only one).
    pub ledger: Option<LedgerSlot>,
    /// The session is refused at attach with this CUDA error (a limit of the zone); the
    /// worker opens no GPU.
    pub refuse: Option<u32>,
    /// Serve a Xen guest's device slot instead of the connection on standard input.
    pub xen: Option<XenSlot>,
    /// The zone's quotas (last: a table in TOML).
    pub quotas: crate::zone::Quotas,
}

/// The zone ledger a worker inherits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSlot {
    /// The inherited memfd.
    pub fd: i32,
    /// This session's slot.
    pub slot: u32,
}

/// A Xen guest's device slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XenSlot {
    /// The guest's domain id.
    pub domid: u16,
    /// Its `device/vgpu/N` slot.
    pub slot: u32,
}

impl WorkerSpec {
    /// The argument that carries the spec.
    pub fn to_arg(&self) -> String {
        toml::to_string(self).expect("a worker spec is plain data")
    }

    /// Reads the spec back.
    pub fn from_arg(arg: &str) -> Result<WorkerSpec, toml::de::Error> {
        toml::from_str(arg)
    }
}

/// How a zone's session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The guest went away (closed its side, or its process/domain died).
    PeerGone,
    /// The guest broke the protocol or corrupted the ring; the zone was failed.
    Violation(ChannelError),
    /// Handling a request panicked (a host-side bug): the request was answered with
    /// `CUDA_ERROR_UNKNOWN` and the session ended, rather than serving on with state that
    /// may be half-updated.
    Panicked {
        /// The request's name (or id).
        request: String,
    },
}

/// Sends a handler's reply for one request through the server.
struct ServerResponder<'s, 'r, M, N, W> {
    server: &'s mut Server<M, N, W>,
    req: &'s Incoming<'r>,
    scratch: &'s mut [u8],
    output: Option<&'s DeviceOutput>,
}

impl<M: SharedMemory, N: Notifier, W: Waiter> Responder for ServerResponder<'_, '_, M, N, W> {
    type Error = ChannelError;

    fn reply<T: Message>(&mut self, reply: &T) -> Result<(), ChannelError> {
        note_device_output(self.server, self.output, self.req.id);
        self.server.reply(self.req, reply, self.scratch)
    }
}

/// Requests after which the driver may have printed device output (it flushes kernels'
/// `printf` buffer when the context synchronises, a blocking copy back included, and when
/// a module or context goes away): after a launch of a kernel whose module may print (the
/// zone notes it), the worker looks at the pipes itself, so that the output rides on this
/// very reply.
const FLUSHING: [MessageId; 8] = [
    CuCtxSynchronize::ID,
    CuStreamSynchronize::ID,
    CuEventSynchronize::ID,
    MemcpyDtoH::ID,
    CtxDestroy::ID,
    PrimaryCtxReset::ID,
    CuModuleUnload::ID,
    CuLibraryUnload::ID,
];

/// Marks the next response with the notice when device output waits for the guest.
fn note_device_output<M: SharedMemory, N: Notifier, W: Waiter>(
    server: &mut Server<M, N, W>,
    output: Option<&DeviceOutput>,
    id: MessageId,
) {
    let Some(o) = output else { return };
    if FLUSHING.contains(&id) {
        o.after_flush();
    }
    if o.pending() {
        server.raise_notice();
    }
}

/// A request that got no reply from its handler: the error to answer it with.
struct Failure {
    kind: ErrorKind,
    code: u32,
}

impl Failure {
    fn app(code: u32) -> Failure {
        Failure { kind: ErrorKind::Application, code }
    }
}

/// Handles one request: `Ok(sent)` when a reply went out (or, for a posted request, was
/// dropped), `Err` with the error to answer instead.
fn handle<M, N, W, B, D>(
    server: &mut Server<M, N, W>,
    window: &DataWindow<D>,
    zone: &mut Zone<B>,
    req: &Incoming<'_>,
    scratch: &mut [u8],
    output: Option<&DeviceOutput>,
) -> Result<Result<(), ChannelError>, Failure>
where
    M: SharedMemory,
    N: Notifier,
    W: Waiter,
    B: GpuBackend,
    D: SharedMemory,
{
    zone.poll_ipc();
    if req.id == Attach::ID {
        let attach = decode_body::<Attach>(req.body).map_err(|e| {
            tracing::debug!(error = %e, "undecodable attach body");
            Failure { kind: ErrorKind::BadBody, code: code::INVALID_VALUE }
        })?;
        let reply = zone.attach(&attach, window.size() as u64).map_err(|e| Failure::app(e.code()))?;
        return Ok(server.reply(req, &reply, scratch));
    }
    if req.no_reply {
        zone.note_posted().map_err(|e| Failure::app(e.code()))?;
    }
    let mut responder = ServerResponder { server, req, scratch, output };
    dispatch(&mut zone.api(window), req.id, req.body, &mut responder).map_err(|e| match e {
        DispatchError::Unknown(id) => {
            tracing::debug!(id = id.0, "unknown request id");
            Failure { kind: ErrorKind::UnknownMessage, code: code::NOT_SUPPORTED }
        }
        DispatchError::BadBody(id) => {
            tracing::debug!(id = id.0, "undecodable request body");
            Failure { kind: ErrorKind::BadBody, code: code::INVALID_VALUE }
        }
        DispatchError::Api(cu) => {
            tracing::trace!(code = cu.code(), "request failed");
            Failure::app(cu.code())
        }
    })
}

/// Per-request timings of one session (host-proxy's `profile_requests`): for each request
/// id, the worker's *service* time — from holding the request's private copy to having
/// answered it (decode, checks, the driver call, the reply) — and the *gap* before it, from
/// the previous answer to this request's copy (waiting for the guest, plus the ring
/// transfer). Compared with the guest's round trip and the native driver call, they say
/// where remoting time goes. Costs two clock reads per request when enabled.
#[derive(Debug, Default)]
pub struct RequestProfile {
    by_id: BTreeMap<u16, Samples>,
    /// Samples held, over all ids (bounded: the ids come from the guest).
    held: usize,
}

#[derive(Debug, Default)]
struct Samples {
    service_ns: Vec<u32>,
    gap_ns: Vec<u32>,
}

/// Samples kept per request id (the first ones; enough for stable medians).
const PROFILE_SAMPLES: usize = 1 << 18;
/// Samples kept in all (8 bytes each: 16 MiB), whatever ids a guest sends.
const PROFILE_SAMPLES_TOTAL: usize = 1 << 21;

impl RequestProfile {
    fn record(&mut self, id: u16, gap_ns: u64, service_ns: u64) {
        if self.held >= PROFILE_SAMPLES_TOTAL {
            return;
        }
        let s = self.by_id.entry(id).or_default();
        if s.service_ns.len() < PROFILE_SAMPLES {
            s.service_ns.push(u32::try_from(service_ns).unwrap_or(u32::MAX));
            s.gap_ns.push(u32::try_from(gap_ns).unwrap_or(u32::MAX));
            self.held += 1;
        }
    }

    /// One line per request id seen, most frequent first: name, count, service p50 and p99,
    /// gap p50 (nanoseconds).
    pub fn report(&mut self) -> Vec<String> {
        // Nearest rank: the smallest sample with at least p % of the samples at or below it.
        fn pct(v: &mut [u32], p: usize) -> u32 {
            v.sort_unstable();
            v.get((v.len() * p).div_ceil(100).saturating_sub(1)).copied().unwrap_or(0)
        }
        let mut rows: Vec<(usize, String)> = self
            .by_id
            .iter_mut()
            .map(|(&id, s)| {
                let n = s.service_ns.len();
                let fallback = if id < 0x0200 { "(protocol)" } else { "(unknown)" };
                let name = request_name(idm_core::MessageId(id)).unwrap_or(fallback);
                let (p50, p99) = (pct(&mut s.service_ns, 50), pct(&mut s.service_ns, 99));
                let gap = pct(&mut s.gap_ns, 50);
                (n, format!("{name} ({id:#06x}): n={n} service p50={p50} ns p99={p99} ns, gap p50={gap} ns"))
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.0));
        rows.into_iter().map(|(_, line)| line).collect()
    }
}

/// Serves requests until the channel ends. `buf` and `scratch` must each hold the
/// negotiated maximum frame. With `profile`, each request's timings are recorded there.
pub fn serve<M, N, W, B, D>(
    server: &mut Server<M, N, W>,
    window: &DataWindow<D>,
    zone: &mut Zone<B>,
    buf: &mut [u8],
    scratch: &mut [u8],
    mut profile: Option<&mut RequestProfile>,
) -> SessionEnd
where
    M: SharedMemory,
    N: Notifier,
    W: Waiter,
    B: GpuBackend,
    D: SharedMemory,
{
    let mut answered = profile.as_ref().map(|_| Instant::now());
    // Held for the session (the zone is borrowed mutably by each request's handling).
    let output = zone.device_output_arc();
    let output = output.as_deref();
    loop {
        let req = match server.recv(buf) {
            Ok(r) => r,
            Err(ChannelError::Notify(idm_core::NotifyError::PeerGone)) => return SessionEnd::PeerGone,
            Err(e) => return SessionEnd::Violation(e),
        };
        let received = Instant::now();
        let span = tracing::trace_span!("request", seq = req.seq, id = req.id.0);
        let _g = span.enter();
        let outcome = catch_unwind(AssertUnwindSafe(|| handle(server, window, zone, &req, scratch, output)));
        let error = match &outcome {
            Ok(Ok(_)) => None,
            Ok(Err(f)) => Some(f.code),
            Err(_) => Some(code::UNKNOWN),
        };
        zone.record_request(req.id.0, elapsed_ns(received), error);
        // For a posted request `reply_error` defers the code to the next reply.
        let sent = match outcome {
            Ok(Ok(sent)) => sent,
            Ok(Err(Failure { kind, code })) => {
                note_device_output(server, output, req.id);
                server.reply_error(&req, kind, code, scratch)
            }
            Err(_) => {
                let request = request_name(req.id).map_or_else(|| format!("{:#06x}", req.id.0), str::to_owned);
                tracing::error!(request, "request handler panicked; failing the request and ending the session");
                // Best effort: the guest learns that this request failed; the session ends
                // either way.
                let _ = server.reply_error(&req, ErrorKind::Application, code::UNKNOWN, scratch);
                return SessionEnd::Panicked { request };
            }
        };
        // What shrank goes back to the zone's other sessions (growth was admitted already).
        zone.publish_usage();
        if let Err(e) = sent {
            return SessionEnd::Violation(e);
        }
        if let (Some(p), Some(prev)) = (profile.as_deref_mut(), answered) {
            let now = Instant::now();
            let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            p.record(req.id.0, ns(received - prev), ns(now - received));
            answered = Some(now);
        }
    }
}

fn elapsed_ns(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The exit status of a worker that refused its session (its zone's limits).
pub const REFUSED_EXIT: i32 = 5;

/// How long a refused session waits for its guest's attach.
const REFUSAL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves a refused session (a limit of the zone): answers its requests — the attach comes
/// first — with CUDA error `code` until the attach has been answered, the guest goes, or
/// `REFUSAL_WAIT` has passed.
pub fn refuse<M: SharedMemory, N: Notifier, W: Waiter>(
    server: &mut Server<M, N, W>,
    code: u32,
    buf: &mut [u8],
    scratch: &mut [u8],
) {
    let deadline = Instant::now() + REFUSAL_WAIT;
    while Instant::now() < deadline {
        let req = match server.recv(buf) {
            Ok(r) => r,
            Err(_) => return,
        };
        let attach = req.id == Attach::ID;
        if server.reply_error(&req, ErrorKind::Application, code, scratch).is_err() || attach {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vgpu_proto::generated::CuStreamQuery;

    #[test]
    fn request_profile_reports_medians_per_request_kind() {
        let mut p = RequestProfile::default();
        for (gap, service) in [(100, 30), (300, 10), (200, 20), (400, 1000)] {
            p.record(CuStreamQuery::ID.0, gap, service);
        }
        p.record(0x0001, 5, 7);
        p.record(0xfff0, 1, 1);
        let lines = p.report();
        assert_eq!(lines.len(), 3);
        let id = CuStreamQuery::ID.0;
        assert_eq!(lines[0], format!("CuStreamQuery ({id:#06x}): n=4 service p50=20 ns p99=1000 ns, gap p50=200 ns"));
        assert!(lines.contains(&"(protocol) (0x0001): n=1 service p50=7 ns p99=7 ns, gap p50=5 ns".to_owned()));
        assert!(lines.contains(&"(unknown) (0xfff0): n=1 service p50=1 ns p99=1 ns, gap p50=1 ns".to_owned()));
    }

    #[test]
    fn request_profile_memory_is_bounded_whatever_the_guest_sends() {
        let mut p = RequestProfile::default();
        for i in 0..(PROFILE_SAMPLES_TOTAL + 1000) {
            p.record((i % 65536) as u16, 1, 1);
        }
        assert_eq!(p.held, PROFILE_SAMPLES_TOTAL);
        assert_eq!(p.by_id.values().map(|s| s.service_ns.len()).sum::<usize>(), PROFILE_SAMPLES_TOTAL);
        for _ in 0..PROFILE_SAMPLES + 10 {
            p.record(7, 1, 1);
        }
        assert_eq!(p.by_id[&7].service_ns.len(), PROFILE_SAMPLES_TOTAL / 65536, "nothing added past the total");
    }
}
