//! Stream-capture queries. libvgpu offers no stream capture (`cuStreamBeginCapture`
//! answers `CUDA_ERROR_NOT_SUPPORTED`), so no stream is ever capturing and every query
//! answers `CU_STREAM_CAPTURE_STATUS_NONE` without asking the host — cuBLASLt asks before
//! its launches and PyTorch before allocations, so a round trip here would be paid on hot
//! paths. The stream handle is not checked against the host (a stale handle gets "not
//! capturing" rather than `CUDA_ERROR_INVALID_HANDLE`); a current context is required, as
//! for every stream call.

use crate::rt::{self, CuError, CuResult, Out};
use cudarc::driver::sys;

/// The answer of every query: not capturing.
const NONE: u32 = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE as u32;

fn not_capturing(status: Out<u32>) -> CuResult<()> {
    rt::current_ctx().ok_or(CuError::INVALID_CONTEXT)?;
    status.set(NONE);
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
pub unsafe fn cu_stream_is_capturing(_stream: sys::CUstream, status: *mut u32) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    not_capturing(unsafe { Out::required(status) }?)
}

/// `cuStreamGetCaptureInfo` (CUDA 10.1): status and, optionally, the capture's id (0).
pub unsafe fn cu_stream_get_capture_info(
    _stream: sys::CUstream,
    status: *mut u32,
    id: *mut sys::cuuint64_t,
) -> CuResult<()> {
    // SAFETY: as cuStreamIsCapturing.
    not_capturing(unsafe { Out::required(status) }?)?;
    // SAFETY: CUDA's contract for the optional out-pointer.
    unsafe { set_opt(id, 0) };
    Ok(())
}

/// `cuStreamGetCaptureInfo_v2` (CUDA 11.3): as v1, and no graph, no dependencies.
pub unsafe fn cu_stream_get_capture_info_v2(
    stream: sys::CUstream,
    status: *mut u32,
    id: *mut sys::cuuint64_t,
    graph: *mut sys::CUgraph,
    deps: *mut *const sys::CUgraphNode,
    num_deps: *mut usize,
) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { cu_stream_get_capture_info(stream, status, id) }?;
    // SAFETY: CUDA's contract for the optional out-pointers.
    unsafe { set_opt(graph, std::ptr::null_mut()) };
    // SAFETY: as above.
    unsafe { set_opt(deps, std::ptr::null()) };
    // SAFETY: as above.
    unsafe { set_opt(num_deps, 0) };
    Ok(())
}

/// `cuStreamGetCaptureInfo_v3` (CUDA 12.3): as v2, and no edge data.
pub unsafe fn cu_stream_get_capture_info_v3(
    stream: sys::CUstream,
    status: *mut u32,
    id: *mut sys::cuuint64_t,
    graph: *mut sys::CUgraph,
    deps: *mut *const sys::CUgraphNode,
    edges: *mut *const sys::CUgraphEdgeData,
    num_deps: *mut usize,
) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { cu_stream_get_capture_info_v2(stream, status, id, graph, deps, num_deps) }?;
    // SAFETY: CUDA's contract for the optional out-pointer.
    unsafe { set_opt(edges, std::ptr::null()) };
    Ok(())
}
