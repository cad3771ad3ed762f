//! Initialisation, versions, errors, entry-point lookup and device queries — all served
//! in the guest from what the host sent once at attach.

use crate::generated::{ERRORS, PROC_TABLE};
use crate::rt::{self, session, CuError, CuResult, Out};
use cudarc::driver::sys;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use vgpu_proto::AttrValue;

/// The only device ordinal a zone has.
fn check_device(dev: sys::CUdevice) -> CuResult<()> {
    if dev == 0 {
        Ok(())
    } else {
        Err(CuError::INVALID_DEVICE)
    }
}

/// `cuInit`.
pub unsafe fn cu_init(flags: c_uint) -> CuResult<()> {
    if flags != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    rt::init().map(drop)
}

/// `cuDriverGetVersion`: the host driver's version (may be called before `cuInit`).
pub unsafe fn cu_driver_get_version(out: *mut c_int) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(out) }?;
    let s = rt::init()?;
    out.set(s.info.device.driver_version as c_int);
    Ok(())
}

fn error_entry(code: c_uint) -> CuResult<&'static (u32, &'static CStr, &'static CStr)> {
    ERRORS.iter().find(|e| e.0 == code).ok_or(CuError::INVALID_VALUE)
}

/// `cuGetErrorName`.
pub unsafe fn cu_get_error_name(error: c_uint, p_str: *mut *const c_char) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(p_str) }?;
    match error_entry(error) {
        Ok(e) => {
            out.set(e.1.as_ptr());
            Ok(())
        }
        Err(e) => {
            out.set(std::ptr::null());
            Err(e)
        }
    }
}

/// `cuGetErrorString`: NVIDIA's text (the name where no text was recorded).
pub unsafe fn cu_get_error_string(error: c_uint, p_str: *mut *const c_char) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(p_str) }?;
    match error_entry(error) {
        Ok(e) => {
            out.set(if e.2.is_empty() { e.1.as_ptr() } else { e.2.as_ptr() });
            Ok(())
        }
        Err(e) => {
            out.set(std::ptr::null());
            Err(e)
        }
    }
}

/// `CU_GET_PROC_ADDRESS_*` symbol status values.
const PROC_FOUND: c_uint = 0;
const PROC_NOT_FOUND: c_uint = 1;
const PROC_VERSION_NOT_SUFFICIENT: c_uint = 2;

/// Looks up `symbol` (a base name such as `cuMemAlloc`) for a caller built against
/// `version`: the newest variant introduced at or before it.
fn proc_lookup(symbol: &str, version: c_int, per_thread: bool) -> Result<*const (), c_uint> {
    let version = u32::try_from(version).unwrap_or(0);
    // With the per-thread flag, a base name's per-thread variants are chosen where it has
    // them (the driver's rule), its ordinary ones otherwise.
    let has_per_thread = per_thread && PROC_TABLE.iter().any(|e| e.base == symbol && e.per_thread);
    let mut any = false;
    let mut best: Option<&rt::ProcEntry> = None;
    for e in PROC_TABLE.iter().filter(|e| e.base == symbol && e.per_thread == has_per_thread) {
        any = true;
        if e.since <= version && best.is_none_or(|b| e.since >= b.since) {
            best = Some(e);
        }
    }
    match best {
        Some(e) => Ok(e.ptr),
        None if any => Err(PROC_VERSION_NOT_SUFFICIENT),
        None => Err(PROC_NOT_FOUND),
    }
}

/// `CU_GET_PROC_ADDRESS_LEGACY_STREAM | CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM`.
const PROC_FLAGS: u64 = 0x3;
/// `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM`.
const PROC_PER_THREAD: u64 = 0x2;

unsafe fn get_proc(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    version: c_int,
    flags: u64,
    status: *mut c_uint,
) -> CuResult<()> {
    let has_status = !status.is_null();
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let pfn = unsafe { Out::required(pfn) }?;
    // SAFETY: as above; the status pointer is optional.
    let status = unsafe { Out::optional(status) }?;
    // SAFETY: CUDA's contract: the symbol is a NUL-terminated string.
    let name = unsafe { rt::c_string(symbol) }?;
    if flags & !PROC_FLAGS != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    // `CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM` picks the `_ptsz`/`_ptds` variants.
    match proc_lookup(&name, version, flags & PROC_PER_THREAD != 0) {
        Ok(ptr) => {
            pfn.set(ptr.cast_mut().cast());
            status.set(PROC_FOUND);
            Ok(())
        }
        Err(st) => {
            rt::log(
                rt::Level::Debug,
                format_args!("cuGetProcAddress: {name} (version {version}, flags {flags}) not found"),
            );
            pfn.set(std::ptr::null_mut());
            status.set(st);
            // With a status out-parameter (v2) the driver reports "not found" there and
            // returns success; v1 has only the return code.
            if has_status {
                Ok(())
            } else {
                Err(CuError::NOT_FOUND)
            }
        }
    }
}

/// `cuGetProcAddress` (CUDA 11.3 signature).
pub unsafe fn cu_get_proc_address(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: sys::cuuint64_t,
) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { get_proc(symbol, pfn, cuda_version, flags, std::ptr::null_mut()) }
}

/// `cuGetProcAddress_v2`.
pub unsafe fn cu_get_proc_address_v2(
    symbol: *const c_char,
    pfn: *mut *mut c_void,
    cuda_version: c_int,
    flags: sys::cuuint64_t,
    symbol_status: *mut c_uint,
) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { get_proc(symbol, pfn, cuda_version, flags, symbol_status) }
}

/// `cuProfilerStart`: no profiler runs in a zone; accepted as a no-op.
pub unsafe fn cu_profiler_start() -> CuResult<()> {
    session().map(drop)
}

/// `cuProfilerStop`.
pub unsafe fn cu_profiler_stop() -> CuResult<()> {
    session().map(drop)
}

/// `cuDeviceGet`.
pub unsafe fn cu_device_get(device: *mut sys::CUdevice, ordinal: c_int) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(device) }?;
    session()?;
    check_device(ordinal)?;
    out.set(0);
    Ok(())
}

/// `cuDeviceGetCount`: one device per zone.
pub unsafe fn cu_device_get_count(count: *mut c_int) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(count) }?;
    session()?;
    out.set(1);
    Ok(())
}

/// Copies `text` into a C buffer of `len` bytes, NUL-terminated, truncated to fit.
unsafe fn write_c_text(buf: *mut c_char, len: c_int, text: &str) -> CuResult<()> {
    let len = usize::try_from(len).map_err(|_| CuError::INVALID_VALUE)?;
    if buf.is_null() || len == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let n = text.len().min(len - 1);
    // SAFETY: the caller's buffer holds `len > n` bytes; the source is `n` bytes of `text`.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr().cast::<c_char>(), buf, n) };
    let end = buf.wrapping_add(n);
    // SAFETY: `n < len`, inside the caller's buffer.
    unsafe { end.write(0) };
    Ok(())
}

/// `cuDeviceGetName`.
pub unsafe fn cu_device_get_name(name: *mut c_char, len: c_int, dev: sys::CUdevice) -> CuResult<()> {
    let s = session()?;
    check_device(dev)?;
    // SAFETY: CUDA's contract: `name` holds `len` bytes.
    unsafe { write_c_text(name, len, s.info.device.name.as_str()) }
}

/// `cuDeviceGetUuid`.
pub unsafe fn cu_device_get_uuid(uuid: *mut sys::CUuuid, dev: sys::CUdevice) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(uuid) }?;
    let s = session()?;
    check_device(dev)?;
    out.set(sys::CUuuid { bytes: s.info.device.uuid.map(|b| b as c_char) });
    Ok(())
}

/// `cuDeviceGetUuid_v2` (the same UUID: a zone sees one whole device or MIG instance).
pub unsafe fn cu_device_get_uuid_v2(uuid: *mut sys::CUuuid, dev: sys::CUdevice) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { cu_device_get_uuid(uuid, dev) }
}

/// `cuDeviceTotalMem_v2`.
pub unsafe fn cu_device_total_mem_v2(bytes: *mut usize, dev: sys::CUdevice) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(bytes) }?;
    let s = session()?;
    check_device(dev)?;
    out.set(s.info.device.total_mem as usize);
    Ok(())
}

/// `cuDeviceGetAttribute`, from the table fetched at attach.
pub unsafe fn cu_device_get_attribute(pi: *mut c_int, attrib: c_uint, dev: sys::CUdevice) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(pi) }?;
    let s = session()?;
    check_device(dev)?;
    let idx = (attrib as usize).checked_sub(1).ok_or(CuError::INVALID_VALUE)?;
    match s.info.attributes.get(idx) {
        Some(AttrValue::Value(v)) => {
            out.set(*v);
            Ok(())
        }
        Some(AttrValue::Error(code)) => Err(CuError::new(*code)),
        None => Err(CuError::INVALID_VALUE),
    }
}

/// `cuDeviceComputeCapability`.
pub unsafe fn cu_device_compute_capability(major: *mut c_int, minor: *mut c_int, dev: sys::CUdevice) -> CuResult<()> {
    // SAFETY: CUDA's contract: non-null out-pointers are valid for one write.
    let major = unsafe { Out::required(major) }?;
    // SAFETY: as above.
    let minor = unsafe { Out::required(minor) }?;
    let s = session()?;
    check_device(dev)?;
    major.set(s.info.device.cc_major as c_int);
    minor.set(s.info.device.cc_minor as c_int);
    Ok(())
}

/// `cuDeviceGetPCIBusId`.
pub unsafe fn cu_device_get_pci_bus_id(bus: *mut c_char, len: c_int, dev: sys::CUdevice) -> CuResult<()> {
    let s = session()?;
    check_device(dev)?;
    // SAFETY: CUDA's contract: `bus` holds `len` bytes.
    unsafe { write_c_text(bus, len, &s.info.pci_bus_id) }
}

/// `cuDeviceGetByPCIBusId`.
pub unsafe fn cu_device_get_by_pci_bus_id(dev: *mut sys::CUdevice, bus: *const c_char) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(dev) }?;
    // SAFETY: CUDA's contract: a NUL-terminated string.
    let want = unsafe { rt::c_string(bus) }?;
    let s = session()?;
    if want.eq_ignore_ascii_case(&s.info.pci_bus_id) {
        out.set(0);
        Ok(())
    } else {
        Err(CuError::INVALID_DEVICE)
    }
}

/// `cuDeviceCanAccessPeer`: a zone has one device, so there is no peer.
pub unsafe fn cu_device_can_access_peer(can: *mut c_int, dev: sys::CUdevice, peer: sys::CUdevice) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(can) }?;
    session()?;
    check_device(dev)?;
    check_device(peer)?;
    out.set(0);
    Ok(())
}

/// `cuDeviceGetProperties` (deprecated), assembled from the attribute table.
pub unsafe fn cu_device_get_properties(prop: *mut sys::CUdevprop, dev: sys::CUdevice) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(prop) }?;
    let s = session()?;
    check_device(dev)?;
    let attr = |a: usize| match s.info.attributes.get(a - 1) {
        Some(AttrValue::Value(v)) => *v,
        _ => 0,
    };
    out.set(sys::CUdevprop {
        maxThreadsPerBlock: attr(1),
        maxThreadsDim: [attr(2), attr(3), attr(4)],
        maxGridSize: [attr(5), attr(6), attr(7)],
        sharedMemPerBlock: attr(8),
        totalConstantMemory: attr(9),
        SIMDWidth: attr(10),
        memPitch: attr(11),
        regsPerBlock: attr(12),
        clockRate: attr(13),
        textureAlign: attr(14),
    });
    Ok(())
}
