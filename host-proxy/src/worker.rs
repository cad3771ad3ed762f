//! The per-zone worker: a synchronous request loop over the zone's idm channel.
//!
//! One worker process per zone owns that zone's CUDA context, so a fault, crash or hang of
//! one zone cannot reach another, and the process's exit releases all its GPU memory. The
//! loop does no async scheduling per call: it spins, then blocks on the doorbell.
//!
//! Each request is decoded from the private copy the channel made, handled inside
//! `catch_unwind` (a bug triggered by one request fails that request, not the host), and
//! answered; asynchronous requests' errors are deferred to the next reply. A channel
//! error (a corrupt ring, a peer that vanished) ends the loop: the zone is torn down.

use crate::backend::GpuBackend;
use crate::zone::{Response, Zone};
use idm_core::wire::proto::ErrorKind;
use idm_core::{ChannelError, DataWindow, Notifier, Server, SharedMemory, Waiter};
use std::panic::{catch_unwind, AssertUnwindSafe};
use vgpu_proto::{CuResult, Request};

/// How a zone's session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The guest went away (closed its side, or its process/domain died).
    PeerGone,
    /// The guest broke the protocol or corrupted the ring; the zone was failed.
    Violation(ChannelError),
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
        let decoded = match Request::decode(req.id, req.body) {
            Ok(Request::Unknown(id)) => {
                tracing::debug!(id = id.0, "unknown request id");
                let r = server.reply_error(&req, ErrorKind::UnknownMessage, CuResult::NOT_SUPPORTED, scratch);
                if let Err(e) = r {
                    return SessionEnd::Violation(e);
                }
                continue;
            }
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "undecodable request body");
                if let Err(e) = server.reply_error(&req, ErrorKind::BadBody, CuResult::INVALID_VALUE, scratch) {
                    return SessionEnd::Violation(e);
                }
                continue;
            }
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| zone.handle(decoded, req.no_reply, window)));
        let sent = match outcome {
            Ok(Ok(resp)) => match resp {
                Response::Done(m) => server.reply(&req, &m, scratch),
                Response::Attach(m) => server.reply(&req, &m, scratch),
                Response::MemAlloc(m) => server.reply(&req, &m, scratch),
                Response::MemInfo(m) => server.reply(&req, &m, scratch),
                Response::Handle(m) => server.reply(&req, &m, scratch),
            },
            Ok(Err(cu)) => server.reply_error(&req, ErrorKind::Application, cu.code(), scratch),
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
