//! Virtual memory management (`cuMemAddressReserve`, `cuMemCreate`, `cuMemMap`,
//! `cuMemSetAccess`, `cuMemUnmap`, `cuMemRelease`, `cuMemAddressFree`,
//! `cuMemGetAllocationGranularity`): forwarded to the host, where the zone checks every range
//! and counts physical memory against its quota (host-proxy's `zone/vmm.rs`).
//!
//! What is offered is what PyTorch's `expandable_segments` allocator asks for: pinned memory
//! of the zone's one device, export as a POSIX file descriptor or fabric handle allowed
//! (exporting itself is not offered), GPUDirect RDMA capability passed on, read or read-write
//! access for that device. Anything else — other locations, Win32 handles, compression,
//! several access descriptors — answers `CUDA_ERROR_NOT_SUPPORTED`, named once in the log. The structures are read field by field:
//! their enums must never be read into Rust enums.

use crate::rt::{self, CuError, CuResult, Out};
use cudarc::driver::sys;
use std::mem::offset_of;
use vgpu_proto::{generated as p, Handle};

/// `CU_MEM_ALLOCATION_TYPE_PINNED`, `CU_MEM_LOCATION_TYPE_DEVICE`,
/// `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`.
const ALLOCATION_PINNED: u32 = 1;
const LOCATION_DEVICE: u32 = 1;
const HANDLE_POSIX_FD: u32 = 1;
/// `CU_MEM_HANDLE_TYPE_FABRIC`.
const HANDLE_FABRIC: u32 = 8;
/// `CU_MEM_ALLOC_GRANULARITY_RECOMMENDED`.
const GRANULARITY_RECOMMENDED: u32 = 1;

/// Reads an allocation property: the export handle types and the gpuDirectRDMACapable flag,
/// for what is offered (the host's driver decides on the rest).
///
/// # Safety
/// A non-null `prop` points to a `CUmemAllocationProp`.
unsafe fn offered_prop(prop: *const sys::CUmemAllocationProp) -> CuResult<(u32, bool)> {
    type P = sys::CUmemAllocationProp;
    if prop.is_null() {
        return Err(CuError::INVALID_VALUE);
    }
    let base = prop.cast::<u8>();
    // SAFETY: the caller's contract; each field read at its own offset as the integer C
    // stores (the location's type and id are its first two 32-bit words).
    let u32_at = |off: usize| unsafe { base.wrapping_add(off).cast::<u32>().read_unaligned() };
    let (kind, handles) = (u32_at(offset_of!(P, type_)), u32_at(offset_of!(P, requestedHandleTypes)));
    let (location, id) = (u32_at(offset_of!(P, location)), u32_at(offset_of!(P, location) + 4));
    // SAFETY: as above, the 8 flag bytes (compression type, gpuDirectRDMACapable, usage …).
    let flags = unsafe { base.wrapping_add(offset_of!(P, allocFlags)).cast::<[u8; 8]>().read_unaligned() };
    if kind != ALLOCATION_PINNED || location != LOCATION_DEVICE || id != 0 {
        return Err(CuError::INVALID_DEVICE);
    }
    if handles & !(HANDLE_POSIX_FD | HANDLE_FABRIC) != 0 {
        return Err(rt::unsupported_err("cuMemCreate with Win32 handle types"));
    }
    if flags[0] != 0 || flags[2..] != [0; 6] {
        return Err(rt::unsupported_err("cuMemCreate with compression or usage flags"));
    }
    Ok((handles, flags[1] != 0))
}

/// `cuMemGetAllocationGranularity`.
pub unsafe fn cu_mem_get_allocation_granularity(
    granularity: *mut usize,
    prop: *const sys::CUmemAllocationProp,
    option: u32,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(granularity) }?;
    // SAFETY: CUDA's contract for `prop`.
    unsafe { offered_prop(prop) }?;
    if option > GRANULARITY_RECOMMENDED {
        return Err(CuError::INVALID_VALUE);
    }
    let r: p::MemGetGranularityReply =
        rt::call(&p::MemGetGranularity { recommended: option == GRANULARITY_RECOMMENDED }, true)?;
    out.set(r.granularity as usize);
    Ok(())
}

/// `cuMemAddressReserve` (flags must be 0).
pub unsafe fn cu_mem_address_reserve(
    ptr: *mut sys::CUdeviceptr,
    size: usize,
    alignment: usize,
    addr: sys::CUdeviceptr,
    flags: u64,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(ptr) }?;
    if flags != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let req = p::MemAddressReserve { size: size as u64, alignment: alignment as u64, addr };
    let r: p::MemAddressReserveReply = rt::call(&req, true)?;
    out.set(r.ptr);
    Ok(())
}

/// `cuMemAddressFree`.
pub unsafe fn cu_mem_address_free(ptr: sys::CUdeviceptr, size: usize) -> CuResult<()> {
    rt::call::<_, vgpu_proto::Done>(&p::MemAddressFree { ptr, size: size as u64 }, true).map(drop)
}

/// `cuMemCreate` (flags must be 0): the handle is the zone's.
pub unsafe fn cu_mem_create(
    handle: *mut sys::CUmemGenericAllocationHandle,
    size: usize,
    prop: *const sys::CUmemAllocationProp,
    flags: u64,
) -> CuResult<()> {
    // SAFETY: CUDA's contract: a non-null out-pointer is valid for one write.
    let out = unsafe { Out::required(handle) }?;
    if flags != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    // SAFETY: CUDA's contract for `prop`.
    let (handle_types, rdma) = unsafe { offered_prop(prop) }?;
    let r: p::MemCreateReply = rt::call(&p::MemCreate { size: size as u64, handle_types, rdma }, true)?;
    out.set(r.handle.0);
    Ok(())
}

/// `cuMemRelease`.
pub unsafe fn cu_mem_release(handle: sys::CUmemGenericAllocationHandle) -> CuResult<()> {
    rt::call::<_, vgpu_proto::Done>(&p::MemRelease { handle: Handle(handle) }, true).map(drop)
}

/// `cuMemMap` (flags must be 0).
pub unsafe fn cu_mem_map(
    ptr: sys::CUdeviceptr,
    size: usize,
    offset: usize,
    handle: sys::CUmemGenericAllocationHandle,
    flags: u64,
) -> CuResult<()> {
    if flags != 0 {
        return Err(CuError::INVALID_VALUE);
    }
    let req = p::MemMap { ptr, size: size as u64, offset: offset as u64, handle: Handle(handle) };
    rt::call::<_, vgpu_proto::Done>(&req, true).map(drop)
}

/// `cuMemUnmap`.
pub unsafe fn cu_mem_unmap(ptr: sys::CUdeviceptr, size: usize) -> CuResult<()> {
    rt::call::<_, vgpu_proto::Done>(&p::MemUnmap { ptr, size: size as u64 }, true).map(drop)
}

/// `cuMemSetAccess`: one descriptor, for the zone's device.
pub unsafe fn cu_mem_set_access(
    ptr: sys::CUdeviceptr,
    size: usize,
    desc: *const sys::CUmemAccessDesc,
    count: usize,
) -> CuResult<()> {
    type D = sys::CUmemAccessDesc;
    if desc.is_null() || count == 0 {
        return Err(CuError::INVALID_VALUE);
    }
    if count > 1 {
        return Err(rt::unsupported_err("cuMemSetAccess with several descriptors"));
    }
    let base = desc.cast::<u8>();
    // SAFETY: CUDA's contract: `desc` holds `count` (1) descriptors; fields read at their
    // offsets as the integers C stores.
    let u32_at = |off: usize| unsafe { base.wrapping_add(off).cast::<u32>().read_unaligned() };
    let (location, id, flags) =
        (u32_at(offset_of!(D, location)), u32_at(offset_of!(D, location) + 4), u32_at(offset_of!(D, flags)));
    if location != LOCATION_DEVICE || id != 0 {
        return Err(CuError::INVALID_DEVICE);
    }
    rt::call::<_, vgpu_proto::Done>(&p::MemSetAccess { ptr, size: size as u64, flags }, true).map(drop)
}
