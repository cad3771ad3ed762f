//! Host memory, pointer attributes and copies.
//!
//! "Pinned" host memory (`cuMemAllocHost`, `cuMemHostAlloc`) is carved from the shared
//! data window, so the host copies from and to it in place; such copies are sent as
//! window descriptors, and the asynchronous ones are posted without waiting. Copies of
//! pageable memory go through the window's staging area in chunks, synchronously (as the
//! driver treats pageable memory). `cuMemHostRegister` without DEVICEMAP records the range
//! (its buffers are copied like pageable ones); with DEVICEMAP (`cudaHostRegisterMapped`)
//! the program's pages are moved into the window in place (`Window::adopt`, local
//! transport, page-aligned start), so the host copies from and to them directly and
//! kernels reach them through `cuMemHostGetDevicePointer`.

use crate::rt::{session, Conn, CuError, CuResult, Out};
use cudarc::driver::sys;
use std::collections::BTreeMap;
use std::ffi::{c_uint, c_void};
use std::sync::Mutex;
use vgpu_proto::generated as p;
use vgpu_proto::{Done, Handle};

/// `CU_MEMHOSTREGISTER_DEVICEMAP`: a device mapping of host memory.
const HOSTREGISTER_DEVICEMAP: c_uint = 0x02;
/// `CU_MEMORYTYPE_HOST` / `CU_MEMORYTYPE_DEVICE`.
const MEMORYTYPE_HOST: u64 = 1;
const MEMORYTYPE_DEVICE: u64 = 2;

/// Ranges registered with `cuMemHostRegister`: start → (length, flags).
static REGISTERED: Mutex<BTreeMap<usize, (usize, c_uint)>> = Mutex::new(BTreeMap::new());

/// `cuMemAllocHost_v2`.
pub unsafe fn cu_mem_alloc_host_v2(pp: *mut *mut c_void, bytesize: usize) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { cu_mem_host_alloc(pp, bytesize, 0) }
}

/// `cuMemHostAlloc`: page-aligned memory from the shared window.
pub unsafe fn cu_mem_host_alloc(pp: *mut *mut c_void, bytesize: usize, flags: c_uint) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(pp) }?;
    let s = session()?;
    let mut c = s.lock();
    c.enter_current()?;
    let ptr = c.window.alloc(bytesize as u64, flags)?;
    out.set(ptr.cast());
    Ok(())
}

/// `cuMemFreeHost` (NULL is accepted and ignored, as by the driver).
pub unsafe fn cu_mem_free_host(ptr: *mut c_void) -> CuResult<()> {
    let s = session()?;
    if ptr.is_null() {
        return Ok(());
    }
    s.lock().window.free(ptr.cast())
}

/// `cuMemHostGetFlags`.
pub unsafe fn cu_mem_host_get_flags(flags: *mut c_uint, ptr: *mut c_void) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(flags) }?;
    let f = session()?.lock().window.flags_of(ptr.cast()).ok_or(CuError::INVALID_VALUE)?;
    out.set(f);
    Ok(())
}

/// `cuMemHostGetDevicePointer_v2`: the device address of pinned memory from
/// `cuMemHostAlloc`/`cuMemAllocHost` (it lives in the shared window, which the host maps for
/// kernels: zero-copy). Memory registered with `cuMemHostRegister` has no device mapping.
pub unsafe fn cu_mem_host_get_device_pointer_v2(
    pdptr: *mut sys::CUdeviceptr,
    p: *mut c_void,
    flags: c_uint,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(pdptr) }?;
    if flags != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let s = session()?;
    let mut c = s.lock();
    c.enter_current()?;
    let at = c.window.pinned(p.cast(), 1).ok_or(CuError::INVALID_VALUE)?;
    let r: p::WindowDevicePointerReply = c.call(&p::WindowDevicePointer { offset: at.offset })?;
    out.set(r.dptr);
    Ok(())
}

/// `cuMemHostRegister_v2`: recorded; copies from the range stay staged (see module docs).
pub unsafe fn cu_mem_host_register_v2(ptr: *mut c_void, bytesize: usize, flags: c_uint) -> CuResult<()> {
    session()?;
    if ptr.is_null() || bytesize == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let start = ptr.addr();
    let end = start.checked_add(bytesize).ok_or(CuError::INVALID_VALUE)?;
    let mut reg = REGISTERED.lock().map_err(|_| CuError::UNKNOWN)?;
    let overlaps = reg.range(..end).next_back().is_some_and(|(&s0, &(l, _))| s0 + l > start);
    if overlaps {
        return Err(CuError::HOST_MEMORY_ALREADY_REGISTERED);
    }
    if flags & HOSTREGISTER_DEVICEMAP != 0 {
        let s = session()?;
        let mut c = s.lock();
        if let Err(e) = c.window.adopt(ptr.cast(), bytesize as u64, flags) {
            crate::rt::log(
                crate::rt::Level::Debug,
                format_args!(
                    "cuMemHostRegister({ptr:p}, {bytesize}, DEVICEMAP): cannot move the pages into the window: {e:?}"
                ),
            );
            return Err(e);
        }
    }
    reg.insert(start, (bytesize, flags));
    Ok(())
}

/// `cuMemHostUnregister`: pages moved into the window go back to private memory.
pub unsafe fn cu_mem_host_unregister(ptr: *mut c_void) -> CuResult<()> {
    let s = session()?;
    let mut reg = REGISTERED.lock().map_err(|_| CuError::UNKNOWN)?;
    let (_, flags) = reg.remove(&ptr.addr()).ok_or(CuError::HOST_MEMORY_NOT_REGISTERED)?;
    if flags & HOSTREGISTER_DEVICEMAP != 0 {
        // Work the host may still be doing in the pages ends before they leave the window
        // (without a current context there is no such work of this thread's to wait for).
        let mut c = s.lock();
        if c.enter_current().is_ok() {
            c.call::<_, Done>(&p::CuCtxSynchronize {})?;
        }
        if let Some(r) = c.window.release_adopted(ptr.cast()) {
            r?;
        }
    }
    Ok(())
}

/// Whether `[p, p + 1)` lies in a range registered with `cuMemHostRegister`.
fn is_registered(p: u64) -> bool {
    let Ok(reg) = REGISTERED.lock() else { return false };
    let p = p as usize;
    reg.range(..=p).next_back().is_some_and(|(&start, &(len, _))| p < start + len)
}

/// Asks the host about a device pointer (in the caller's current context).
fn host_attribute(c: &mut Conn, attribute: c_uint, ptr: u64) -> CuResult<u64> {
    c.enter_current()?;
    let r: p::PointerGetAttributeReply = c.call(&p::PointerGetAttribute { attribute, ptr })?;
    Ok(r.value)
}

/// Attributes whose value is an `unsigned int`/`int`/`bool` (4 bytes), as opposed to
/// pointers, handles and sizes (8 bytes).
fn is_four_bytes(attribute: c_uint) -> bool {
    // MEMORY_TYPE, SYNC_MEMOPS, IS_MANAGED, DEVICE_ORDINAL, IS_LEGACY_CUDA_IPC_CAPABLE,
    // MAPPED, ACCESS_FLAGS, IS_GPU_DIRECT_RDMA_CAPABLE.
    matches!(attribute, 2 | 6 | 8 | 9 | 10 | 13 | 14 | 15 | 18)
}

/// One attribute: window memory is answered here, device memory by the host.
unsafe fn attribute_into(c: &mut Conn, data: *mut c_void, attribute: c_uint, ptr: u64) -> CuResult<()> {
    if data.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let host_ptr = std::ptr::without_provenance::<u8>(ptr as usize);
    let value = if c.window.flags_of(host_ptr).is_some() || is_registered(ptr) {
        match attribute {
            1 => c.host_ctx().0,
            2 => MEMORYTYPE_HOST,
            4 => ptr,
            8 | 13 => u64::from(attribute == 13),
            9 => 0,
            _ => return Err(CuError::INVALID_VALUE),
        }
    } else {
        host_attribute(c, attribute, ptr)?
    };
    if is_four_bytes(attribute) {
        // SAFETY: CUDA's contract: `data` holds the attribute's 4-byte value type.
        unsafe { data.cast::<u32>().write_unaligned(value as u32) };
    } else {
        // SAFETY: CUDA's contract: `data` holds the attribute's 8-byte value type.
        unsafe { data.cast::<u64>().write_unaligned(value) };
    }
    Ok(())
}

/// `cuPointerGetAttribute`.
pub unsafe fn cu_pointer_get_attribute(data: *mut c_void, attribute: c_uint, ptr: sys::CUdeviceptr) -> CuResult<()> {
    let s = session()?;
    let mut c = s.lock();
    // SAFETY: forwarded contract.
    unsafe { attribute_into(&mut c, data, attribute, ptr) }
}

/// `cuPointerGetAttributes`: attributes that do not apply leave their slot untouched, as
/// the driver does; the first other error is returned.
pub unsafe fn cu_pointer_get_attributes(
    n: c_uint,
    attributes: *mut c_uint,
    data: *mut *mut c_void,
    ptr: sys::CUdeviceptr,
) -> CuResult<()> {
    if n == 0 || attributes.is_null() || data.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let s = session()?;
    let mut c = s.lock();
    for i in 0..n as usize {
        // SAFETY: CUDA's contract: `attributes` and `data` hold `n` entries.
        let attribute = unsafe { attributes.wrapping_add(i).read_unaligned() };
        // SAFETY: as above.
        let slot = unsafe { data.wrapping_add(i).read_unaligned() };
        // SAFETY: CUDA's contract: each slot holds its attribute's value type.
        match unsafe { attribute_into(&mut c, slot, attribute, ptr) } {
            Ok(()) | Err(CuError::INVALID_VALUE) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---- copies ------------------------------------------------------------------------------

/// Host-to-device copy of `len` bytes at `src` in the current context.
unsafe fn htod(dst: u64, src: *const c_void, len: usize, stream: Handle, asynchronous: bool) -> CuResult<()> {
    let s = session()?;
    let mut c = s.lock();
    c.enter_current()?;
    if len == 0 {
        return Ok(());
    }
    if src.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    if let Some(desc) = c.window.pinned(src.cast(), len as u64) {
        return if asynchronous {
            c.post(&p::MemcpyHtoDAsync { dst, src: desc, stream })
        } else {
            c.call::<_, Done>(&p::MemcpyHtoD { dst, src: desc, stream }).map(drop)
        };
    }
    if asynchronous && crate::rt::captures_open() {
        drop(c);
        if super::capture::handle_is_capturing(stream)? {
            // Captured: through a pinned shadow, refilled by a host node at every launch.
            return super::graph::capture_pageable_copy(src.expose_provenance(), dst, len, stream, false);
        }
        c = s.lock();
        c.enter_current()?;
    }
    // SAFETY: CUDA's contract: `src` is readable for `len` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(src.cast::<u8>(), len) };
    // Pipelined through the two staging halves: the guest fills one while the host copies
    // the other to the device. A fence after each posted chunk tells us the chunk before
    // it is done, so its half can be refilled (and surfaces a failed chunk's error now).
    let halves = c.window.staging_halves();
    let chunk = halves[0].len as usize;
    let mut parts = bytes.chunks(chunk).enumerate().peekable();
    let mut desc = match parts.peek() {
        Some((_, first)) => c.window.fill(halves[0], first)?,
        None => return Ok(()),
    };
    while let Some((i, _)) = parts.next() {
        let dst = dst.checked_add((i * chunk) as u64).ok_or(CuError::INVALID_VALUE)?;
        c.post(&p::MemcpyHtoD { dst, src: desc, stream })?;
        if let Some((j, next)) = parts.peek() {
            desc = c.window.fill(halves[j % 2], next)?;
        }
        let _: Done = c.call(&p::Fence {})?;
    }
    Ok(())
}

/// Device-to-host copy of `len` bytes into `dst` in the current context.
unsafe fn dtoh(dst: *mut c_void, src: u64, len: usize, stream: Handle, asynchronous: bool) -> CuResult<()> {
    let s = session()?;
    let mut c = s.lock();
    c.enter_current()?;
    if len == 0 {
        return Ok(());
    }
    if dst.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    if let Some(desc) = c.window.pinned(dst.cast_const().cast(), len as u64) {
        // The host writes the window in place, in request order: later synchronising
        // calls return only after it has.
        return if asynchronous {
            c.post(&p::MemcpyDtoHAsync { dst: desc, src, stream })
        } else {
            c.call::<_, Done>(&p::MemcpyDtoH { dst: desc, src, stream }).map(drop)
        };
    }
    if asynchronous && crate::rt::captures_open() {
        drop(c);
        if super::capture::handle_is_capturing(stream)? {
            // Captured: into a pinned shadow, copied out by a host node at every launch.
            return super::graph::capture_pageable_copy(dst.expose_provenance(), src, len, stream, true);
        }
        c = s.lock();
        c.enter_current()?;
    }
    // SAFETY: CUDA's contract: `dst` is writable for `len` bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(dst.cast::<u8>(), len) };
    // Pipelined: while the guest drains chunk i from one staging half, the host copies
    // chunk i + 1 into the other. The fence after a posted chunk means it has landed.
    let halves = c.window.staging_halves();
    let chunk = halves[0].len as usize;
    let count = len.div_ceil(chunk);
    let request = |i: usize| -> CuResult<p::MemcpyDtoH> {
        let n = chunk.min(len - i * chunk);
        let src = src.checked_add((i * chunk) as u64).ok_or(CuError::INVALID_VALUE)?;
        Ok(p::MemcpyDtoH { dst: idm_core::BulkRef { offset: halves[i % 2].offset, len: n as u64 }, src, stream })
    };
    c.post(&request(0)?)?;
    let _: Done = c.call(&p::Fence {})?;
    for (i, part) in bytes.chunks_mut(chunk).enumerate() {
        if i + 1 < count {
            c.post(&request(i + 1)?)?;
        }
        c.window.drain(halves[i % 2], part)?;
        if i + 1 < count {
            let _: Done = c.call(&p::Fence {})?;
        }
    }
    Ok(())
}

/// `cuMemcpyHtoD_v2`.
pub unsafe fn cu_memcpy_hto_d_v2(dst: sys::CUdeviceptr, src: *const c_void, n: usize) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { htod(dst, src, n, Handle(0), false) }
}

/// `cuMemcpyHtoDAsync_v2`.
pub unsafe fn cu_memcpy_hto_d_async_v2(
    dst: sys::CUdeviceptr,
    src: *const c_void,
    n: usize,
    stream: sys::CUstream,
) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { htod(dst, src, n, crate::rt::stream_arg(stream)?, true) }
}

/// `cuMemcpyDtoH_v2`.
pub unsafe fn cu_memcpy_dto_h_v2(dst: *mut c_void, src: sys::CUdeviceptr, n: usize) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { dtoh(dst, src, n, Handle(0), false) }
}

/// `cuMemcpyDtoHAsync_v2`.
pub unsafe fn cu_memcpy_dto_h_async_v2(
    dst: *mut c_void,
    src: sys::CUdeviceptr,
    n: usize,
    stream: sys::CUstream,
) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { dtoh(dst, src, n, crate::rt::stream_arg(stream)?, true) }
}

/// Whether `ptr` is device memory of this zone (asks the host; window memory is host).
fn is_device(ptr: u64) -> CuResult<bool> {
    let s = session()?;
    let mut c = s.lock();
    is_device_in(&mut c, ptr)
}

/// [`is_device`] on a connection already held: the window's pinned memory is host memory;
/// otherwise the host says whether the address is one of the zone's device ranges.
pub(super) fn is_device_in(c: &mut Conn, ptr: u64) -> CuResult<bool> {
    if c.window.pinned(std::ptr::without_provenance(ptr as usize), 1).is_some() {
        return Ok(false);
    }
    match host_attribute(c, 2, ptr) {
        Ok(t) => Ok(t == MEMORYTYPE_DEVICE),
        Err(CuError::INVALID_VALUE) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The unified copy: the direction follows from where each pointer lives.
unsafe fn unified(dst: u64, src: u64, n: usize, stream: Handle, asynchronous: bool) -> CuResult<()> {
    let (d, s) = (is_device(dst)?, is_device(src)?);
    // Host pointers came from the application as integers (the C ABI's CUdeviceptr).
    let host = |v: u64| std::ptr::with_exposed_provenance_mut::<c_void>(v as usize);
    match (d, s) {
        // SAFETY: forwarded contract — `src` is valid host memory.
        (true, false) => unsafe { htod(dst, host(src), n, stream, asynchronous) },
        // SAFETY: as above.
        (false, true) => unsafe { dtoh(host(dst), src, n, stream, asynchronous) },
        (true, true) => {
            let req = p::CuMemcpyDtoDV2 { dst_device: dst, src_device: src, byte_count: n as u64 };
            let s = session()?;
            let mut c = s.lock();
            c.enter_current()?;
            if asynchronous {
                c.post(&p::CuMemcpyDtoDAsyncV2 {
                    dst_device: dst,
                    src_device: src,
                    byte_count: n as u64,
                    h_stream: stream,
                })
            } else {
                c.call::<_, Done>(&req).map(drop)
            }
        }
        (false, false) => {
            if n != 0 {
                let (from, to) = (host(src).cast::<u8>(), host(dst).cast::<u8>());
                // SAFETY: CUDA's contract: both are host buffers of at least `n` bytes.
                unsafe { std::ptr::copy(from, to, n) };
            }
            Ok(())
        }
    }
}

/// `cuMemcpy`.
pub unsafe fn cu_memcpy(dst: sys::CUdeviceptr, src: sys::CUdeviceptr, n: usize) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { unified(dst, src, n, Handle(0), false) }
}

/// `cuMemcpyAsync`.
pub unsafe fn cu_memcpy_async(
    dst: sys::CUdeviceptr,
    src: sys::CUdeviceptr,
    n: usize,
    stream: sys::CUstream,
) -> CuResult<()> {
    // SAFETY: forwarded contract.
    unsafe { unified(dst, src, n, crate::rt::stream_arg(stream)?, true) }
}
