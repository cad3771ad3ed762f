//! The per-zone worker: a synchronous request loop over the zone's idm channel.
//!
//! One worker process per zone owns that zone's CUDA contexts, so a fault, crash or hang of
//! one zone cannot reach another, and the process's exit releases all its GPU memory. The
//! loop does no async scheduling per call: it spins, then blocks on the doorbell.
//!
//! Each request is decoded from the private copy the channel made — [`Attach`] by hand,
//! every other request by the generated [`dispatch`] into the zone's [`Api`] implementation
//! ([`crate::zone::ZoneCtx`]) — handled inside `catch_unwind` (a bug triggered by one
//! request fails that request, not the host), and answered; asynchronous (posted)
//! requests' errors are deferred to the next reply. A channel error (a corrupt ring, a peer
//! that vanished) ends the loop: the zone is torn down. Before each request the zone applies
//! IPC revocations the daemon sent ([`Zone::poll_ipc`]), so no request reaches memory whose
//! exporter has freed it.
//!
//! [`Api`]: vgpu_proto::generated::Api

use crate::backend::GpuBackend;
use crate::zone::Zone;
use idm_core::wire::decode_body;
use idm_core::wire::proto::ErrorKind;
use idm_core::{ChannelError, DataWindow, Incoming, Message, Notifier, Server, SharedMemory, Waiter};
use std::panic::{catch_unwind, AssertUnwindSafe};
use vgpu_proto::generated::{dispatch, DispatchError, Responder};
use vgpu_proto::{Attach, CuResult};

/// How a zone's session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The guest went away (closed its side, or its process/domain died).
    PeerGone,
    /// The guest broke the protocol or corrupted the ring; the zone was failed.
    Violation(ChannelError),
}

/// Sends a handler's reply for one request through the server.
struct ServerResponder<'s, 'r, M, N, W> {
    server: &'s mut Server<M, N, W>,
    req: &'s Incoming<'r>,
    scratch: &'s mut [u8],
}

impl<M: SharedMemory, N: Notifier, W: Waiter> Responder for ServerResponder<'_, '_, M, N, W> {
    type Error = ChannelError;

    fn reply<T: Message>(&mut self, reply: &T) -> Result<(), ChannelError> {
        self.server.reply(self.req, reply, self.scratch)
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
            Failure { kind: ErrorKind::BadBody, code: CuResult::INVALID_VALUE }
        })?;
        let reply = zone.attach(&attach, window.size() as u64).map_err(|e| Failure::app(e.code()))?;
        return Ok(server.reply(req, &reply, scratch));
    }
    if req.no_reply {
        zone.note_posted().map_err(|e| Failure::app(e.code()))?;
    }
    let mut responder = ServerResponder { server, req, scratch };
    dispatch(&mut zone.api(window), req.id, req.body, &mut responder).map_err(|e| match e {
        DispatchError::Unknown(id) => {
            tracing::debug!(id = id.0, "unknown request id");
            Failure { kind: ErrorKind::UnknownMessage, code: CuResult::NOT_SUPPORTED }
        }
        DispatchError::BadBody(id) => {
            tracing::debug!(id = id.0, "undecodable request body");
            Failure { kind: ErrorKind::BadBody, code: CuResult::INVALID_VALUE }
        }
        DispatchError::Api(cu) => {
            tracing::trace!(code = cu.code(), "request failed");
            Failure::app(cu.code())
        }
    })
}

/// Serves requests until the channel ends. `buf` and `scratch` must each hold the
/// negotiated maximum frame.
pub fn serve<M, N, W, B, D>(
    server: &mut Server<M, N, W>,
    window: &DataWindow<D>,
    zone: &mut Zone<B>,
    buf: &mut [u8],
    scratch: &mut [u8],
) -> SessionEnd
where
    M: SharedMemory,
    N: Notifier,
    W: Waiter,
    B: GpuBackend,
    D: SharedMemory,
{
    loop {
        let req = match server.recv(buf) {
            Ok(r) => r,
            Err(ChannelError::Notify(idm_core::NotifyError::PeerGone)) => return SessionEnd::PeerGone,
            Err(e) => return SessionEnd::Violation(e),
        };
        let span = tracing::trace_span!("request", seq = req.seq, id = req.id.0);
        let _g = span.enter();
        let outcome = catch_unwind(AssertUnwindSafe(|| handle(server, window, zone, &req, scratch)));
        // For a posted request `reply_error` defers the code to the next reply.
        let sent = match outcome {
            Ok(Ok(sent)) => sent,
            Ok(Err(Failure { kind, code })) => server.reply_error(&req, kind, code, scratch),
            Err(_) => {
                tracing::error!("request handler panicked; failing the request");
                server.reply_error(&req, ErrorKind::Application, CuResult::UNKNOWN, scratch)
            }
        };
        if let Err(e) = sent {
            return SessionEnd::Violation(e);
        }
    }
}
