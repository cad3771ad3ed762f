//! CUDA IPC, brokered by host-proxy: the 64-byte handle the application sees is an opaque
//! token the host issued; the driver's own IPC handle never reaches a guest. The host
//! decides whether an open is allowed (same zone today; sharing groups later) and maps the
//! memory into the opener's own context.

use crate::rt::{handle_of, handle_ptr, session, CuError, CuResult, Out};
use cudarc::driver::sys;
use std::ffi::{c_char, c_uint};
use vgpu_proto::generated as p;
use vgpu_proto::Done;

/// Size of `CUipcMemHandle`.
const HANDLE_LEN: usize = 64;

/// `cuIpcGetMemHandle`: `dptr` must be the start of one of this zone's allocations.
pub unsafe fn cu_ipc_get_mem_handle(handle: *mut sys::CUipcMemHandle, dptr: sys::CUdeviceptr) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(handle) }?;
    let s = session()?;
    let mut c = s.lock();
    c.enter_current()?;
    let r: p::IpcGetMemHandleReply = c.call(&p::IpcGetMemHandle { dptr })?;
    let bytes: [u8; HANDLE_LEN] = r.handle.as_slice().try_into().map_err(|_| CuError::UNKNOWN)?;
    out.set(sys::CUipcMemHandle { reserved: bytes.map(|b| b as c_char) });
    Ok(())
}

/// `cuIpcOpenMemHandle_v2`.
pub unsafe fn cu_ipc_open_mem_handle_v2(
    pdptr: *mut sys::CUdeviceptr,
    handle: sys::CUipcMemHandle,
    flags: c_uint,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(pdptr) }?;
    let s = session()?;
    let mut c = s.lock();
    c.enter_current()?;
    let handle = handle.reserved.iter().map(|&b| b as u8).collect();
    let r: p::IpcOpenMemHandleReply = c.call(&p::IpcOpenMemHandle { handle, flags })?;
    out.set(r.dptr);
    Ok(())
}

/// `cuIpcCloseMemHandle`.
pub unsafe fn cu_ipc_close_mem_handle(dptr: sys::CUdeviceptr) -> CuResult<()> {
    let s = session()?;
    let mut c = s.lock();
    c.enter_current()?;
    let _: Done = c.call(&p::IpcCloseMemHandle { dptr })?;
    Ok(())
}

/// `cuIpcGetEventHandle`: the event must be made with `CU_EVENT_INTERPROCESS` (the host's
/// driver checks); the handle is a token of the host's, like a memory handle.
pub unsafe fn cu_ipc_get_event_handle(handle: *mut sys::CUipcEventHandle, event: sys::CUevent) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(handle) }?;
    let s = session()?;
    let mut c = s.lock();
    c.enter_current()?;
    let r: p::IpcGetEventHandleReply = c.call(&p::IpcGetEventHandle { event: handle_of(event) })?;
    let bytes: [u8; HANDLE_LEN] = r.handle.as_slice().try_into().map_err(|_| CuError::UNKNOWN)?;
    out.set(sys::CUipcEventHandle { reserved: bytes.map(|b| b as c_char) });
    Ok(())
}

/// `cuIpcOpenEventHandle`: an event of another process of this zone or of a zone it shares
/// a group with, opened in the current context.
pub unsafe fn cu_ipc_open_event_handle(event: *mut sys::CUevent, handle: sys::CUipcEventHandle) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(event) }?;
    let s = session()?;
    let mut c = s.lock();
    c.enter_current()?;
    let handle = handle.reserved.iter().map(|&b| b as u8).collect();
    let r: p::IpcOpenEventHandleReply = c.call(&p::IpcOpenEventHandle { handle })?;
    out.set(handle_ptr(r.event));
    Ok(())
}
