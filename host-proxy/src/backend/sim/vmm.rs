//! Virtual memory management in the simulated GPU (a test double: see the parent module).
//!
//! A reservation is a fresh address range; a physical allocation holds its bytes (counted as
//! device memory from creation to release). Mapping moves the bytes to an allocation at the
//! mapped address (so copies and kernels reach them as any memory) and unmapping moves them
//! back, so contents persist across unmap and map as on the driver. The double maps a
//! physical allocation at one place at a time and only whole (offset 0, its full size):
//! anything else is `CUDA_ERROR_NOT_SUPPORTED` — a limit of the double, not of CUDA.

use super::*;

/// The double's allocation granularity (the driver's minimum on the H200: 2 MiB).
const GRANULARITY: u64 = 2 << 20;

/// A simulated physical allocation.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SimPhys(u64);

/// A physical allocation's bytes (`None` while mapped: they live in the mapping).
#[derive(Debug)]
pub(super) struct PhysState {
    bytes: Option<Vec<u8>>,
    size: u64,
    /// Where it is mapped.
    at: Option<u64>,
}

impl SimGpu {
    /// Bytes of physical allocations held.
    pub(super) fn phys_bytes(&self) -> u64 {
        self.phys.values().map(|p| p.size).sum()
    }

    pub(super) fn address_reserve(&mut self, size: u64, alignment: u64) -> CuResult<u64> {
        if size == 0 || size % GRANULARITY != 0 || (alignment != 0 && !alignment.is_power_of_two()) {
            return Err(CuError::INVALID_VALUE);
        }
        let align = alignment.max(GRANULARITY);
        let start = self.next_addr.div_ceil(align).checked_mul(align).ok_or(CuError::OUT_OF_MEMORY)?;
        self.next_addr = start;
        let ptr = self.place(size)?;
        self.reservations.insert(ptr, size);
        Ok(ptr)
    }

    pub(super) fn address_free(&mut self, ptr: u64, size: u64) -> CuResult<()> {
        match self.reservations.get(&ptr) {
            Some(&s) if s == size => {
                self.reservations.remove(&ptr);
                Ok(())
            }
            _ => Err(CuError::INVALID_VALUE),
        }
    }

    pub(super) fn create_phys(&mut self, size: u64) -> CuResult<SimPhys> {
        if size == 0 || size % GRANULARITY != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        if size > self.total - self.used {
            return Err(CuError::OUT_OF_MEMORY);
        }
        let len = usize::try_from(size).map_err(|_| CuError::OUT_OF_MEMORY)?;
        let id = next_id();
        self.phys.insert(id, PhysState { bytes: Some(vec![0xa5; len]), size, at: None });
        self.used += size;
        Ok(SimPhys(id))
    }

    pub(super) fn release_phys(&mut self, phys: SimPhys) -> CuResult<()> {
        let p = self.phys.get(&phys.0).ok_or(CuError::INVALID_HANDLE)?;
        if p.at.is_some() {
            return Err(CuError::INVALID_VALUE);
        }
        let size = p.size;
        // Dropping the bytes is the double's scrub.
        self.phys.remove(&phys.0);
        self.used -= size;
        Ok(())
    }

    pub(super) fn map(&mut self, ptr: u64, size: u64, offset: u64, phys: &SimPhys) -> CuResult<()> {
        let inside = self.reservations.range(..=ptr).next_back().is_some_and(|(&s, &l)| ptr + size <= s + l);
        let p = self.phys.get_mut(&phys.0).ok_or(CuError::INVALID_HANDLE)?;
        if !inside || ptr % GRANULARITY != 0 {
            return Err(CuError::INVALID_VALUE);
        }
        if offset != 0 || size != p.size || p.at.is_some() {
            return Err(CuError::NOT_SUPPORTED);
        }
        let bytes = p.bytes.take().ok_or(CuError::NOT_SUPPORTED)?;
        p.at = Some(ptr);
        self.allocs.insert(ptr, SimAlloc { data: Backing::Heap(bytes), ctx: PRIMARY, owner: Owner::Mapped(phys.0) });
        Ok(())
    }

    pub(super) fn unmap(&mut self, ptr: u64, size: u64) -> CuResult<()> {
        let end = ptr.checked_add(size).ok_or(CuError::INVALID_VALUE)?;
        let starts: Vec<u64> = self.allocs.range(ptr..end).map(|(&s, _)| s).collect();
        for s in starts {
            let Some(a) = self.allocs.remove(&s) else { continue };
            let Owner::Mapped(id) = a.owner else {
                self.allocs.insert(s, a);
                return Err(CuError::INVALID_VALUE);
            };
            let Backing::Heap(bytes) = a.data else { return Err(CuError::INVALID_VALUE) };
            if let Some(p) = self.phys.get_mut(&id) {
                p.bytes = Some(bytes);
                p.at = None;
            }
        }
        Ok(())
    }

    pub(super) fn set_access(&mut self, ptr: u64, size: u64, flags: u32) -> CuResult<()> {
        if !matches!(flags, 1 | 3) {
            return Err(CuError::INVALID_VALUE);
        }
        // Mapped memory throughout (one mapping or several adjoining ones).
        let end = ptr.checked_add(size).ok_or(CuError::INVALID_VALUE)?;
        let mut at = ptr;
        while at < end {
            let (&s, a) = self.allocs.range(..=at).next_back().ok_or(CuError::INVALID_VALUE)?;
            let len = a.data.bytes().len() as u64;
            if !matches!(a.owner, Owner::Mapped(_)) || s + len <= at {
                return Err(CuError::INVALID_VALUE);
            }
            at = s + len;
        }
        Ok(())
    }

    pub(super) fn granularity() -> u64 {
        GRANULARITY
    }
}
