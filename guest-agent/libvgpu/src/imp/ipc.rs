//! CUDA IPC, brokered by host-proxy: the 64-byte handle the application sees is an opaque
//! token the host issued; the driver's own IPC handle never reaches a guest. The host
//! decides whether an open is allowed (same zone today; sharing groups later) and maps the
//! memory into the opener's own context.

use crate::rt::{session, CuError, CuResult, Out};
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
