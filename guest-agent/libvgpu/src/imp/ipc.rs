//! CUDA IPC. Handles must be brokered by host-proxy (a zone never sees the driver's IPC
//! handle); the broker and the cross-zone policy are not built yet, so these calls answer
//! `CUDA_ERROR_NOT_SUPPORTED` and say so once in the log.

use crate::rt::{self, session, CuError, CuResult};
use cudarc::driver::sys;
use std::ffi::c_uint;

fn not_yet(name: &'static str) -> CuResult<()> {
    session()?;
    rt::unsupported(name);
    Err(CuError::NOT_SUPPORTED)
}

/// `cuIpcGetMemHandle`.
pub unsafe fn cu_ipc_get_mem_handle(_handle: *mut sys::CUipcMemHandle, _dptr: sys::CUdeviceptr) -> CuResult<()> {
    not_yet("cuIpcGetMemHandle")
}

/// `cuIpcOpenMemHandle_v2`.
pub unsafe fn cu_ipc_open_mem_handle_v2(
    _pdptr: *mut sys::CUdeviceptr,
    _handle: sys::CUipcMemHandle,
    _flags: c_uint,
) -> CuResult<()> {
    not_yet("cuIpcOpenMemHandle_v2")
}

/// `cuIpcCloseMemHandle`.
pub unsafe fn cu_ipc_close_mem_handle(_dptr: sys::CUdeviceptr) -> CuResult<()> {
    not_yet("cuIpcCloseMemHandle")
}
