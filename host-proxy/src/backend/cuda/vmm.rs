//! Virtual memory management on the real driver (`cuMemAddressReserve`, `cuMemCreate`,
//! `cuMemMap`, `cuMemSetAccess`, `cuMemUnmap`, `cuMemRelease`, `cuMemAddressFree`).
//!
//! Physical allocations are ids in this backend's table, like streams; every range passed in
//! was checked by the zone. The driver's structures are this module's own mirrors with
//! their enums as plain integers (see the parent module's docs). A physical allocation is
//! scrubbed before it is released: mapped at a scratch reservation, zeroed, synchronized,
//! unmapped — so the next owner of the memory never sees this zone's data.

use super::*;

/// A physical allocation of a [`CudaGpu`] (an id, like [`CudaStream`]).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CudaPhys {
    id: u64,
}

/// `CUmemAllocationProp` with its enums as plain integers.
#[repr(C)]
#[derive(Debug)]
pub(super) struct RawAllocProp {
    alloc_type: c_uint,
    handle_types: c_uint,
    location_type: c_uint,
    location_id: c_int,
    win32_metadata: *mut c_void,
    alloc_flags: [u8; 8],
}

/// `CUmemAccessDesc` with its enums as plain integers.
#[repr(C)]
#[derive(Debug)]
pub(super) struct RawAccessDesc {
    location_type: c_uint,
    location_id: c_int,
    flags: c_uint,
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<RawAllocProp>() == size_of::<sys::CUmemAllocationProp_st>());
    assert!(offset_of!(RawAllocProp, location_type) == offset_of!(sys::CUmemAllocationProp_st, location));
    assert!(offset_of!(RawAllocProp, win32_metadata) == offset_of!(sys::CUmemAllocationProp_st, win32HandleMetaData));
    assert!(offset_of!(RawAllocProp, alloc_flags) == offset_of!(sys::CUmemAllocationProp_st, allocFlags));
    assert!(size_of::<RawAccessDesc>() == size_of::<sys::CUmemAccessDesc_st>());
    assert!(offset_of!(RawAccessDesc, flags) == offset_of!(sys::CUmemAccessDesc_st, flags));
};

/// `CU_MEM_ALLOCATION_TYPE_PINNED`, `CU_MEM_LOCATION_TYPE_DEVICE`,
/// `CU_MEM_ACCESS_FLAGS_PROT_READWRITE`.
const ALLOCATION_PINNED: c_uint = 1;
const LOCATION_DEVICE: c_uint = 1;
const ACCESS_READWRITE: c_uint = 3;
/// `CU_MEM_ALLOC_GRANULARITY_MINIMUM` and `…_RECOMMENDED`.
const GRANULARITY_MINIMUM: c_uint = 0;
const GRANULARITY_RECOMMENDED: c_uint = 1;

impl CudaGpu {
    /// Pinned memory on this device, with `handle_types` export allowed.
    fn alloc_prop(&self, handle_types: c_uint) -> RawAllocProp {
        RawAllocProp {
            alloc_type: ALLOCATION_PINNED,
            handle_types,
            location_type: LOCATION_DEVICE,
            location_id: self.device,
            win32_metadata: std::ptr::null_mut(),
            alloc_flags: [0; 8],
        }
    }

    /// Access for this device.
    fn access(&self, flags: c_uint) -> RawAccessDesc {
        RawAccessDesc { location_type: LOCATION_DEVICE, location_id: self.device, flags }
    }

    fn size_of(v: u64) -> CuResult<usize> {
        usize::try_from(v).map_err(|_| CuError::INVALID_VALUE)
    }

    pub(super) fn granularity(&mut self, recommended: bool) -> CuResult<u64> {
        self.enter()?;
        let prop = self.alloc_prop(0);
        let option = if recommended { GRANULARITY_RECOMMENDED } else { GRANULARITY_MINIMUM };
        let mut g = 0usize;
        // SAFETY: valid out-pointer; `prop` has `CUmemAllocationProp`'s layout (asserted).
        check(unsafe { (self.api.mem_get_granularity)(&mut g, &prop, option) })?;
        Ok(g as u64)
    }

    pub(super) fn address_reserve(&mut self, size: u64, alignment: u64, addr: u64) -> CuResult<u64> {
        self.enter()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; the driver validates size, alignment and the hint.
        check(unsafe {
            (self.api.mem_address_reserve)(&mut ptr, Self::size_of(size)?, Self::size_of(alignment)?, addr, 0)
        })?;
        Ok(ptr)
    }

    pub(super) fn address_free(&mut self, ptr: u64, size: u64) -> CuResult<()> {
        self.enter()?;
        // SAFETY: a whole reservation of this backend with nothing mapped (the zone checked).
        check(unsafe { (self.api.mem_address_free)(ptr, Self::size_of(size)?) })
    }

    pub(super) fn create_phys(&mut self, size: u64, handle_types: u32, rdma: bool) -> CuResult<CudaPhys> {
        self.enter()?;
        let mut prop = self.alloc_prop(handle_types);
        // `allocFlags`: compression type, then gpuDirectRDMACapable.
        prop.alloc_flags[1] = u8::from(rdma);
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: valid out-pointer; `prop` has the driver's layout; the driver validates the
        // size against the granularity.
        check(unsafe { (self.api.mem_create)(&mut handle, Self::size_of(size)?, &prop, 0) })?;
        let id = next_id();
        self.phys.insert(id, (handle, size));
        Ok(CudaPhys { id })
    }

    /// The driver handle and size of `phys`.
    fn raw_phys(&self, phys: &CudaPhys) -> CuResult<(sys::CUmemGenericAllocationHandle, u64)> {
        self.phys.get(&phys.id).copied().ok_or(CuError::INVALID_HANDLE)
    }

    pub(super) fn map(&mut self, ptr: u64, size: u64, offset: u64, phys: &CudaPhys) -> CuResult<()> {
        let (handle, _) = self.raw_phys(phys)?;
        self.enter()?;
        // SAFETY: `ptr .. ptr + size` lies in a reservation of this backend over nothing
        // mapped, and `offset + size` inside the allocation (the zone checked both).
        check(unsafe { (self.api.mem_map)(ptr, Self::size_of(size)?, Self::size_of(offset)?, handle, 0) })
    }

    pub(super) fn unmap(&mut self, ptr: u64, size: u64) -> CuResult<()> {
        self.enter()?;
        // SAFETY: whole mappings of this backend covering exactly the range (zone-checked).
        check(unsafe { (self.api.mem_unmap)(ptr, Self::size_of(size)?) })
    }

    pub(super) fn set_access(&mut self, ptr: u64, size: u64, flags: u32) -> CuResult<()> {
        self.enter()?;
        let desc = self.access(flags);
        // SAFETY: mapped memory of this backend (zone-checked); one descriptor.
        check(unsafe { (self.api.mem_set_access)(ptr, Self::size_of(size)?, &desc, 1) })
    }

    pub(super) fn release_phys(&mut self, phys: CudaPhys) -> CuResult<()> {
        let (handle, size) = self.raw_phys(&phys)?;
        let scrubbed = self.scrub_phys(handle, size);
        if let Err(e) = scrubbed {
            // Kept rather than handed back with this zone's data in it.
            tracing::warn!(%e, size, "could not scrub a physical allocation; it is not released");
            return Err(e);
        }
        self.phys.remove(&phys.id);
        // SAFETY: a live handle with no mapping left, out of the table now: released once.
        check(unsafe { (self.api.mem_release)(handle) })
    }

    /// Zeroes a physical allocation through a scratch mapping.
    fn scrub_phys(&mut self, handle: sys::CUmemGenericAllocationHandle, size: u64) -> CuResult<()> {
        let ptr = self.address_reserve(size, 0, 0)?;
        let n = Self::size_of(size)?;
        // SAFETY: a fresh reservation of `size` bytes, the whole allocation from offset 0.
        let mapped = check(unsafe { (self.api.mem_map)(ptr, n, 0, handle, 0) });
        let zeroed = mapped.and_then(|()| {
            let desc = self.access(ACCESS_READWRITE);
            // SAFETY: the mapping just made; one descriptor.
            check(unsafe { (self.api.mem_set_access)(ptr, n, &desc, 1) })?;
            // SAFETY: `n` bytes of the mapping just made, accessible.
            check(unsafe { (self.api.memset_d8)(ptr, 0, n) })?;
            self.ctx_synchronize()
        });
        if mapped.is_ok() {
            // SAFETY: the scratch mapping made above.
            let _ = unsafe { (self.api.mem_unmap)(ptr, n) };
        }
        // SAFETY: the scratch reservation made above, nothing mapped in it any more.
        let _ = unsafe { (self.api.mem_address_free)(ptr, n) };
        zeroed
    }
}
