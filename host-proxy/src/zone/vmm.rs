//! Virtual memory management: the zone's side of `cuMemAddressReserve`, `cuMemCreate`,
//! `cuMemMap`, `cuMemSetAccess`, `cuMemUnmap`, `cuMemRelease` and `cuMemAddressFree` (what
//! PyTorch's `expandable_segments` allocator uses).
//!
//! Reservations are address ranges of the zone (bounded in number); a physical allocation is
//! a handle of the zone that counts against its memory quota from `cuMemCreate` until its
//! memory is gone — released *and* no longer mapped anywhere, as the driver frees it — and is
//! scrubbed by the backend before it goes back. A mapping must lie inside one reservation,
//! over nothing already mapped, within its physical allocation; it becomes one of the zone's
//! device ranges (`Owner::Mapped`), so copies, memsets, launches' pointer queries and IPC see
//! it as they see an allocation, and `cuMemFree` refuses it. An unmap must cover whole
//! mappings, contiguously, as the driver requires. Mappings and reservations belong to no
//! context (as in CUDA): only their own calls or the zone's end release them.

use super::*;

/// Reservations a zone may hold at once (PyTorch makes one per expandable segment).
pub const MAX_RESERVATIONS: usize = 1024;
/// `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR` and `CU_MEM_HANDLE_TYPE_FABRIC`.
const HANDLE_POSIX_FD: u32 = 1;
const HANDLE_FABRIC: u32 = 8;
/// The largest reservation (2^48 bytes: the GPU's virtual address space).
const MAX_RESERVATION_BYTES: u64 = 1 << 48;

/// A physical allocation of the zone.
pub(super) struct PhysEntry<P> {
    obj: Option<P>,
    size: u64,
    /// Mappings of it that are live.
    maps: u32,
    /// `cuMemRelease` was called: the handle names nothing any more; the memory goes with
    /// its last mapping.
    released: bool,
}

impl<P> PhysEntry<P> {
    /// Its size (the zone's tests check the accounting with it).
    #[cfg(test)]
    pub(super) fn size_for_test(&self) -> u64 {
        self.size
    }
}

impl<B: GpuBackend> Zone<B> {
    /// Bytes of physical memory the zone holds (released ones until their last unmap).
    pub(super) fn phys_bytes(&self) -> u64 {
        self.phys.iter().map(|(_, e)| e.size).sum()
    }

    /// The physical allocation `h` names (not released).
    fn phys_live(&self, h: Handle) -> CuResult<&PhysEntry<B::Phys>> {
        let e = self.phys.get(h)?;
        if e.released {
            return Err(CuError::INVALID_HANDLE);
        }
        Ok(e)
    }

    /// The reservation holding `[ptr, ptr + size)`.
    fn reservation_of(&self, ptr: u64, size: u64) -> CuResult<(u64, u64)> {
        let (&start, &len) = self.reservations.range(..=ptr).next_back().ok_or(CuError::INVALID_VALUE)?;
        let end = ptr.checked_add(size).ok_or(CuError::INVALID_VALUE)?;
        if end > start + len {
            return Err(CuError::INVALID_VALUE);
        }
        Ok((start, len))
    }

    /// The mapped ranges that cover `[ptr, ptr + size)` exactly and contiguously.
    fn mappings_covering(&self, ptr: u64, size: u64) -> CuResult<Vec<(u64, Range)>> {
        let end = ptr.checked_add(size).ok_or(CuError::INVALID_VALUE)?;
        let found: Vec<(u64, Range)> = self.ranges.range(ptr..end).map(|(&s, r)| (s, *r)).collect();
        let mut at = ptr;
        for (s, r) in &found {
            if *s != at || !matches!(r.owner, Owner::Mapped(_)) {
                return Err(CuError::INVALID_VALUE);
            }
            at = s + r.size;
        }
        if size == 0 || at != end {
            return Err(CuError::INVALID_VALUE);
        }
        Ok(found)
    }

    /// One mapping of `phys` is gone: its memory too when it was released and this was the
    /// last.
    fn drop_mapping(&mut self, phys: Handle) -> CuResult<()> {
        let Ok(e) = self.phys.get_mut(phys) else { return Ok(()) };
        e.maps = e.maps.saturating_sub(1);
        if e.released && e.maps == 0 {
            return self.free_phys(phys);
        }
        Ok(())
    }

    /// Gives a physical allocation's memory back (scrubbed by the backend).
    fn free_phys(&mut self, phys: Handle) -> CuResult<()> {
        let mut e = self.phys.remove(phys)?;
        self.mem_used = self.mem_used.saturating_sub(e.size);
        match e.obj.take() {
            Some(obj) => self.backend.mem_release(obj),
            None => Ok(()),
        }
    }

    /// Unmaps, releases and frees everything (teardown; mapped ranges were unmapped by the
    /// caller's range sweep).
    pub(super) fn release_vmm(&mut self) {
        for mut e in self.phys.drain() {
            if let Some(obj) = e.obj.take() {
                if let Err(err) = self.backend.mem_release(obj) {
                    tracing::warn!(error = %err, "physical allocation release failed during teardown");
                }
            }
        }
        for (ptr, size) in std::mem::take(&mut self.reservations) {
            if let Err(err) = self.backend.mem_address_free(ptr, size) {
                tracing::warn!(error = %err, "address range free failed during teardown");
            }
        }
    }

    // ---- the requests (called by `ZoneCtx`'s `Api` methods) ----

    pub(super) fn mem_granularity(&mut self, recommended: bool) -> CuResult<u64> {
        self.backend.mem_granularity(recommended)
    }

    pub(super) fn mem_address_reserve(&mut self, size: u64, alignment: u64, addr: u64) -> CuResult<u64> {
        if size == 0 || size > MAX_RESERVATION_BYTES {
            return Err(CuError::INVALID_VALUE);
        }
        if self.reservations.len() >= MAX_RESERVATIONS {
            return Err(CuError::OUT_OF_MEMORY);
        }
        let ptr = self.backend.mem_address_reserve(size, alignment, addr)?;
        let overlaps =
            self.reservations.range(..ptr.saturating_add(size)).next_back().is_some_and(|(&s, &l)| s + l > ptr);
        if overlaps || !self.range_is_free(ptr, size) {
            tracing::error!(ptr, size, "backend reserved a range overlapping a known one");
            let _ = self.backend.mem_address_free(ptr, size);
            return Err(CuError::UNKNOWN);
        }
        self.reservations.insert(ptr, size);
        Ok(ptr)
    }

    pub(super) fn mem_address_free(&mut self, ptr: u64, size: u64) -> CuResult<()> {
        if self.reservations.get(&ptr) != Some(&size) {
            return Err(CuError::INVALID_VALUE);
        }
        let end = ptr.checked_add(size).ok_or(CuError::INVALID_VALUE)?;
        if self.ranges.range(ptr..end).next().is_some() {
            // Still mapped: unmap first (the driver refuses too).
            return Err(CuError::INVALID_VALUE);
        }
        self.backend.mem_address_free(ptr, size)?;
        self.reservations.remove(&ptr);
        Ok(())
    }

    pub(super) fn mem_create(&mut self, size: u64, handle_types: u32, rdma: bool) -> CuResult<Handle> {
        if size == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        // POSIX file descriptor and fabric exports may be asked for (never used here).
        if handle_types & !(HANDLE_POSIX_FD | HANDLE_FABRIC) != 0 {
            return Err(CuError::NOT_SUPPORTED);
        }
        self.admit(size, 1)?;
        let obj = match self.backend.mem_create(size, handle_types, rdma) {
            Ok(obj) => obj,
            Err(e) => {
                self.publish_usage();
                return Err(e);
            }
        };
        let h = self.phys.insert(PhysEntry { obj: Some(obj), size, maps: 0, released: false })?;
        self.mem_used += size;
        Ok(h)
    }

    pub(super) fn mem_release(&mut self, handle: Handle) -> CuResult<()> {
        self.phys_live(handle)?;
        let maps = match self.phys.get_mut(handle) {
            Ok(e) => {
                e.released = true;
                e.maps
            }
            Err(_) => return Err(CuError::INVALID_HANDLE),
        };
        if maps == 0 {
            self.free_phys(handle)?;
        }
        Ok(())
    }

    pub(super) fn mem_map(&mut self, ptr: u64, size: u64, offset: u64, handle: Handle) -> CuResult<()> {
        if size == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let e = self.phys_live(handle)?;
        if offset.checked_add(size).is_none_or(|end| end > e.size) {
            return Err(CuError::INVALID_VALUE);
        }
        self.reservation_of(ptr, size)?;
        if !self.range_is_free(ptr, size) {
            return Err(CuError::INVALID_VALUE);
        }
        self.reserve()?;
        let obj = self.phys.get(handle)?.obj.as_ref().ok_or(CuError::INVALID_HANDLE)?;
        self.backend.mem_map(ptr, size, offset, obj)?;
        self.insert_range(ptr, size, NO_CTX, Owner::Mapped(handle));
        if let Ok(e) = self.phys.get_mut(handle) {
            e.maps += 1;
        }
        Ok(())
    }

    pub(super) fn mem_unmap(&mut self, ptr: u64, size: u64) -> CuResult<()> {
        let covered = self.mappings_covering(ptr, size)?;
        // As the driver's unmap, wait for work that may still use the memory.
        self.backend.synchronize()?;
        self.backend.mem_unmap(ptr, size)?;
        let mut first_err = Ok(());
        for (start, r) in covered {
            self.unexport(start);
            self.ranges.remove(&start);
            if let Owner::Mapped(phys) = r.owner {
                if let Err(e) = self.drop_mapping(phys) {
                    first_err = first_err.and(Err(e));
                }
            }
        }
        first_err
    }

    pub(super) fn mem_set_access(&mut self, ptr: u64, size: u64, flags: u32) -> CuResult<()> {
        if !matches!(flags, 1 | 3) {
            return Err(CuError::INVALID_VALUE);
        }
        // Inside mapped memory of the zone (one mapping or several adjoining ones).
        let end = ptr.checked_add(size).ok_or(CuError::INVALID_VALUE)?;
        let mut at = ptr;
        while at < end {
            let (start, r) = self.range_at(at).ok_or(CuError::INVALID_VALUE)?;
            if !matches!(r.owner, Owner::Mapped(_)) {
                return Err(CuError::INVALID_VALUE);
            }
            at = start + r.size;
        }
        if size == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        self.backend.mem_set_access(ptr, size, flags)
    }
}
