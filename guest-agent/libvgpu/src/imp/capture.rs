//! Stream capture: begin and end, the capture mode, and the capture queries.
//!
//! A capture runs in the host's driver: the host stream captures the requests this process
//! sends for it, and `cuStreamEndCapture` hands back the driver's graph. While a capture is
//! open every request waits for its reply (`rt::Conn::post`), so what cannot be captured is
//! refused at the call, as natively. The queries (`cuStreamIsCapturing`,
//! `cuStreamGetCaptureInfo*`) are asked often — cuBLASLt before its launches, PyTorch before
//! every allocation — so while no capture of this process is open (`rt::captures_open`)
//! they answer `CU_STREAM_CAPTURE_STATUS_NONE` in the guest without a round trip (and
//! without checking the stream handle against the host: a stale handle gets "not
//! capturing" rather than `CUDA_ERROR_INVALID_HANDLE`); otherwise the host's driver answers.
//! Of the optional outputs, the capture's graph and its current dependencies are not
//! offered while a capture is active (`CUDA_ERROR_NOT_SUPPORTED`, named in the log).
//!
//! The host's worker runs every request on one thread, so `cuThreadExchangeStreamCaptureMode`
//! sets the mode of that thread: for the whole process rather than the calling thread.

use crate::rt::{self, CuError, CuResult, Out};
use cudarc::driver::sys;
use vgpu_proto::generated as p;

/// `CU_STREAM_CAPTURE_STATUS_NONE`.
const NONE: u32 = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE as u32;
/// `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED` and `…_UNJOINED`: the capture ended anyway.
const ENDED_BADLY: [u32; 2] = [901, 904];

/// The capture status and id of `stream`.
fn status_of(stream: sys::CUstream) -> CuResult<(u32, u64)> {
    rt::current_ctx().ok_or(CuError::INVALID_CONTEXT)?;
    if !rt::captures_open() {
        return Ok((NONE, 0));
    }
    status_of_handle(rt::stream_arg(stream)?)
}

/// The capture status and id of the host stream `stream` (asked of the host).
fn status_of_handle(stream: vgpu_proto::Handle) -> CuResult<(u32, u64)> {
    let r: p::StreamCaptureInfoReply = rt::call(&p::StreamCaptureInfo { stream }, true)?;
    Ok((r.status, r.id))
}

/// Whether the host stream `stream` is capturing now (asked of the host only while a
/// capture is open).
pub fn handle_is_capturing(stream: vgpu_proto::Handle) -> CuResult<bool> {
    Ok(rt::captures_open() && status_of_handle(stream)?.0 != NONE)
}

/// Whether `stream` is capturing now (asked of the host only while a capture is open).
pub fn is_capturing(stream: sys::CUstream) -> CuResult<bool> {
    Ok(status_of(stream)?.0 != NONE)
}

/// `cuStreamBeginCapture_v2`.
pub unsafe fn cu_stream_begin_capture_v2(stream: sys::CUstream, mode: u32) -> CuResult<()> {
    let stream = rt::stream_arg(stream)?;
    rt::call::<_, vgpu_proto::Done>(&p::StreamBeginCapture { stream, mode }, true)?;
    rt::note_capture(true);
    Ok(())
}

/// `cuStreamEndCapture`.
pub unsafe fn cu_stream_end_capture(stream: sys::CUstream, graph: *mut sys::CUgraph) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(graph) }?;
    let handle = rt::stream_arg(stream)?;
    let r = rt::call::<_, p::StreamEndCaptureReply>(&p::StreamEndCapture { stream: handle }, true);
    // Ended; or ended badly (invalidated, unjoined); or ended, but the graph found no room in
    // the host's handle quota (out of memory). Any other error ended nothing (a stream that
    // was not capturing, a stale handle): the count must not drop for it.
    let ended = match &r {
        Ok(_) => true,
        Err(e) => ENDED_BADLY.contains(&e.0.get()) || *e == CuError::OUT_OF_MEMORY,
    };
    if ended {
        rt::note_capture(false);
    }
    out.set(rt::handle_ptr(r?.graph));
    Ok(())
}

/// `cuThreadExchangeStreamCaptureMode`.
pub unsafe fn cu_thread_exchange_stream_capture_mode(mode: *mut u32) -> CuResult<()> {
    if mode.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract: `mode` is valid for a read and a write.
    let want = unsafe { mode.read() };
    let r: p::ThreadExchangeCaptureModeReply = rt::call(&p::ThreadExchangeCaptureMode { mode: want }, false)?;
    // SAFETY: as above.
    unsafe { mode.write(r.previous) };
    Ok(())
}

/// Writes `value` through an optional out-pointer.
///
/// # Safety
/// A non-null `p` must be valid for one write.
unsafe fn set_opt<T>(p: *mut T, value: T) {
    if !p.is_null() {
        // SAFETY: the caller's contract.
        unsafe { p.write(value) };
    }
}

/// `cuStreamIsCapturing`.
pub unsafe fn cu_stream_is_capturing(stream: sys::CUstream, status: *mut u32) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(status) }?;
    out.set(status_of(stream)?.0);
    Ok(())
}

/// `cuStreamGetCaptureInfo` (CUDA 10.1): status and, optionally, the capture's id.
pub unsafe fn cu_stream_get_capture_info(
    stream: sys::CUstream,
    status: *mut u32,
    id: *mut sys::cuuint64_t,
) -> CuResult<()> {
    // SAFETY: as cuStreamIsCapturing.
    let out = unsafe { Out::required(status) }?;
    let (s, capture) = status_of(stream)?;
    out.set(s);
    // SAFETY: CUDA's contract for the optional out-pointer.
    unsafe { set_opt(id, capture) };
    Ok(())
}

/// `cuStreamGetCaptureInfo_v2` (CUDA 11.3): as v1, and the graph and dependencies (none
/// when not capturing; not offered while capturing).
pub unsafe fn cu_stream_get_capture_info_v2(
    stream: sys::CUstream,
    status: *mut u32,
    id: *mut sys::cuuint64_t,
    graph: *mut sys::CUgraph,
    deps: *mut *const sys::CUgraphNode,
    num_deps: *mut usize,
) -> CuResult<()> {
    // SAFETY: as cuStreamIsCapturing.
    let out = unsafe { Out::required(status) }?;
    let (s, capture) = status_of(stream)?;
    if s != NONE && !(graph.is_null() && deps.is_null() && num_deps.is_null()) {
        return Err(rt::unsupported_err("the capture graph and dependencies of cuStreamGetCaptureInfo"));
    }
    out.set(s);
    // SAFETY: CUDA's contract for the optional out-pointers.
    unsafe { set_opt(id, capture) };
    // SAFETY: as above.
    unsafe { set_opt(graph, std::ptr::null_mut()) };
    // SAFETY: as above.
    unsafe { set_opt(deps, std::ptr::null()) };
    // SAFETY: as above.
    unsafe { set_opt(num_deps, 0) };
    Ok(())
}

/// `cuStreamGetCaptureInfo_v3` (CUDA 12.3): as v2, and the edge data.
pub unsafe fn cu_stream_get_capture_info_v3(
    stream: sys::CUstream,
    status: *mut u32,
    id: *mut sys::cuuint64_t,
    graph: *mut sys::CUgraph,
    deps: *mut *const sys::CUgraphNode,
    edges: *mut *const sys::CUgraphEdgeData,
    num_deps: *mut usize,
) -> CuResult<()> {
    if !edges.is_null() && rt::captures_open() && is_capturing(stream)? {
        return Err(rt::unsupported_err("the edge data of cuStreamGetCaptureInfo_v3"));
    }
    // SAFETY: forwarded contract.
    unsafe { cu_stream_get_capture_info_v2(stream, status, id, graph, deps, num_deps) }?;
    // SAFETY: CUDA's contract for the optional out-pointer.
    unsafe { set_opt(edges, std::ptr::null()) };
    Ok(())
}
