//! The shared data window as libvgpu uses it: a staging area for pageable copies at its
//! start, and an arena from which `cuMemAllocHost`/`cuMemHostAlloc` carve "pinned" host
//! memory. The host reads and writes pinned buffers in place, so copies from or to them
//! need no extra copy on the guest side.

use crate::rt::{CuError, CuResult};
use crate::transport::{Mapping, Mem};
use idm_core::BulkRef;
use idm_core::DataWindow;
use idm_shm::ChannelLayout;
use std::collections::BTreeMap;

/// Bytes at the window's start used to stage pageable copies (the rest is the arena).
pub const STAGING: u64 = 16 << 20;
/// Arena allocations are page-aligned, as the driver's pinned allocations are.
const ALIGN: u64 = 4096;

/// One pinned allocation.
#[derive(Clone, Copy, Debug)]
struct Block {
    len: u64,
    flags: u32,
}

/// The window of this process's connection.
pub struct Window {
    data: DataWindow<Mem>,
    /// Keeps the mapping alive; `base` points into it.
    region: Mapping,
    /// Where the window starts in the region (its byte offset in the memfd).
    region_offset: u64,
    base: *mut u8,
    size: u64,
    blocks: BTreeMap<u64, Block>,
    /// The program's own pages moved into the window in place (`cuMemHostRegister` with
    /// DEVICEMAP): program address → (arena offset, length).
    adopted: BTreeMap<usize, (u64, u64)>,
}

// SAFETY: `base` points into `_region`'s shared mapping, which lives as long as the
// `Window` and is not tied to a thread; the window is used under the connection's lock.
unsafe impl Send for Window {}

impl Window {
    /// Wraps the client's window of `region` (laid out by `layout`).
    pub fn new(data: DataWindow<Mem>, region: Mapping, layout: ChannelLayout) -> Window {
        let base = region.base().wrapping_add(layout.window_offset());
        Window {
            data,
            region,
            region_offset: layout.window_offset() as u64,
            base,
            size: layout.window_size() as u64,
            blocks: BTreeMap::new(),
            adopted: BTreeMap::new(),
        }
    }

    /// Bytes available for staging one chunk of a pageable copy.
    pub fn staging_len(&self) -> u64 {
        STAGING.min(self.size)
    }

    /// The two halves of the staging area used to pipeline pageable copies: while the host
    /// copies one half to or from the device, the guest fills or drains the other.
    pub fn staging_halves(&self) -> [BulkRef; 2] {
        let half = self.staging_len() / 2;
        [BulkRef { offset: 0, len: half }, BulkRef { offset: half, len: half }]
    }

    /// Copies `src` into the window at `at` (at most `at.len` bytes; `at` is inside the
    /// staging area). A plain memcpy: this side trusts the host, which only reads a staging
    /// half while the guest leaves it alone (the copy protocol's fences).
    pub fn fill(&self, at: BulkRef, src: &[u8]) -> CuResult<BulkRef> {
        let len = src.len() as u64;
        if len > at.len || at.offset.checked_add(len).is_none_or(|end| end > self.staging_len()) {
            return Err(CuError::INVALID_VALUE);
        }
        let dst = self.base.wrapping_add(at.offset as usize);
        // `[at.offset, at.offset + len)` lies in the staging area of the window's live
        // mapping (checked above); `src` is a distinct, readable slice.
        parallel_copy(src.as_ptr(), dst, src.len());
        if crate::rt::counting() {
            crate::rt::STATS.staged.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(BulkRef { offset: at.offset, len })
    }

    /// Copies the first `dst.len()` bytes at `at` out of the window (see [`fill`](Self::fill)).
    pub fn drain(&self, at: BulkRef, dst: &mut [u8]) -> CuResult<()> {
        let len = dst.len() as u64;
        if len > at.len || at.offset.checked_add(len).is_none_or(|end| end > self.staging_len()) {
            return Err(CuError::INVALID_VALUE);
        }
        let src = self.base.wrapping_add(at.offset as usize);
        // As in `fill`, in the other direction.
        parallel_copy(src.cast_const(), dst.as_mut_ptr(), dst.len());
        if crate::rt::counting() {
            crate::rt::STATS.staged.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Writes bytes at a window offset (module images in a temporary arena block).
    pub fn write_at(&self, desc: BulkRef, src: &[u8]) -> CuResult<()> {
        self.data.write(desc, src).map_err(|_| CuError::INVALID_VALUE)
    }

    /// Carves `len` bytes (page-aligned) out of the arena.
    pub fn alloc(&mut self, len: u64, flags: u32) -> CuResult<*mut u8> {
        if len == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let need = len.checked_next_multiple_of(ALIGN).ok_or(CuError::OUT_OF_MEMORY)?;
        let mut start = self.staging_len().next_multiple_of(ALIGN);
        for (&off, b) in &self.blocks {
            if off.saturating_sub(start) >= need {
                break;
            }
            start = (off + b.len).next_multiple_of(ALIGN);
        }
        if start.checked_add(need).is_none_or(|end| end > self.size) {
            return Err(CuError::OUT_OF_MEMORY);
        }
        self.blocks.insert(start, Block { len, flags });
        Ok(self.base.wrapping_add(start as usize))
    }

    /// Returns a block made by [`alloc`](Self::alloc); `p` must be its start.
    pub fn free(&mut self, p: *const u8) -> CuResult<()> {
        let off = self.offset_of(p).ok_or(CuError::INVALID_VALUE)?;
        self.blocks.remove(&off).map(drop).ok_or(CuError::INVALID_VALUE)
    }

    /// The flags a block was allocated with, for any address inside it.
    pub fn flags_of(&self, p: *const u8) -> Option<u32> {
        let off = self.offset_of(p)?;
        let (&start, b) = self.blocks.range(..=off).next_back()?;
        (off < start + b.len).then_some(b.flags)
    }

    /// Moves the program's pages `[p, p + len)` (page-aligned start) into the window in
    /// place, for `cuMemHostRegister` with DEVICEMAP: an arena block gets their contents,
    /// then the block's pages of the shared memfd are mapped over them at the same address
    /// (`MAP_FIXED`), so the program keeps its pointer and the host (and kernels, through
    /// the window's device mapping) see the same bytes. Local transport only (the Xen
    /// window is granted pages, not a file to map): `CUDA_ERROR_NOT_SUPPORTED` there, and
    /// for a start that is not page-aligned. Bytes a thread of the program writes into the
    /// range while it is being moved may be lost (the driver pins in place and loses none).
    pub fn adopt(&mut self, p: *mut u8, len: u64, flags: u32) -> CuResult<()> {
        let Mapping::Shm(region) = &self.region else { return Err(CuError::NOT_SUPPORTED) };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&region.fd());
        if p.addr() % ALIGN as usize != 0 || len == 0 {
            return Err(CuError::NOT_SUPPORTED);
        }
        let len = len.checked_next_multiple_of(ALIGN).ok_or(CuError::INVALID_VALUE)?;
        let end = p.addr().checked_add(len as usize).ok_or(CuError::INVALID_VALUE)?;
        if self.adopted.range(..end).next_back().is_some_and(|(&s, &(_, l))| s + l as usize > p.addr()) {
            return Err(CuError::HOST_MEMORY_ALREADY_REGISTERED);
        }
        let block = self.alloc(len, flags)?;
        let off = block.addr() - self.base.addr();
        let file_off = self.region_offset + off as u64;
        if file_off % ALIGN != 0 {
            let _ = self.free(block);
            return Err(CuError::NOT_SUPPORTED);
        }
        // SAFETY: `p .. p + len` is the program's memory it asked to register (CUDA's
        // contract: readable and writable), `block` a fresh arena block of `len` bytes in
        // the live mapping; they cannot overlap (the arena is this library's).
        unsafe { std::ptr::copy_nonoverlapping(p.cast_const(), block, len as usize) };
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_SHARED | libc::MAP_FIXED;
        // SAFETY: replaces the program's pages at `p` (page-aligned, its own, `len` bytes)
        // with the memfd's pages at `file_off` (inside the window: the block), which hold
        // the same bytes now.
        let got = unsafe { libc::mmap(p.cast(), len as usize, prot, flags, fd, file_off as libc::off_t) };
        if got != p.cast() {
            let _ = self.free(block);
            return Err(CuError::OUT_OF_MEMORY);
        }
        self.adopted.insert(p.addr(), (off as u64, len));
        Ok(())
    }

    /// Undoes [`adopt`](Self::adopt) for the range starting at `p`: fresh private pages
    /// with the range's current bytes replace the window's there, and the block is freed.
    /// `None` if `p` starts no adopted range.
    pub fn release_adopted(&mut self, p: *mut u8) -> Option<CuResult<()>> {
        let (off, len) = self.adopted.remove(&p.addr())?;
        let block = self.base.wrapping_add(off as usize);
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
        // SAFETY: `p .. p + len` is the adopted range (the memfd's pages, mapped by adopt);
        // new anonymous pages replace them, and the bytes are still in the window block.
        let got = unsafe { libc::mmap(p.cast(), len as usize, prot, flags, -1, 0) };
        if got != p.cast() {
            return Some(Err(CuError::OUT_OF_MEMORY));
        }
        // SAFETY: the block (live, `len` bytes) and the new private pages do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(block.cast_const(), p, len as usize) };
        Some(self.free(block))
    }

    /// The window range of `[p, p + len)` when it lies inside one adopted range.
    fn adopted_range(&self, p: *const u8, len: u64) -> Option<BulkRef> {
        let (&start, &(off, l)) = self.adopted.range(..=p.addr()).next_back()?;
        let inner = (p.addr() - start) as u64;
        (inner.checked_add(len)? <= l).then_some(BulkRef { offset: off + inner, len })
    }

    /// The window range of `[p, p + len)` when it lies inside one pinned block (or in
    /// program memory adopted into one).
    pub fn pinned(&self, p: *const u8, len: u64) -> Option<BulkRef> {
        if let Some(r) = self.adopted_range(p, len) {
            return Some(r);
        }
        let off = self.offset_of(p)?;
        let (&start, b) = self.blocks.range(..=off).next_back()?;
        let end = off.checked_add(len)?;
        (end <= start + b.len).then_some(BulkRef { offset: off, len })
    }

    /// The window's descriptor of a temporary block (for module images).
    pub fn desc_of(&self, p: *const u8, len: u64) -> CuResult<BulkRef> {
        self.pinned(p, len).ok_or(CuError::INVALID_VALUE)
    }

    fn offset_of(&self, p: *const u8) -> Option<u64> {
        let off = (p.addr()).checked_sub(self.base.addr())? as u64;
        (off < self.size).then_some(off)
    }
}

/// Copies at least this many bytes with several threads (one memcpy thread cannot keep up
/// with the DMA engine: ≈ 12 GB/s against 55 GB/s on an H200 host).
const PARALLEL_COPY_MIN: usize = 2 << 20;
/// Threads of a parallel copy.
const COPY_THREADS: usize = 4;

/// `memcpy` of `len` bytes, split across threads when large. Only called by [`Window::fill`]
/// and [`Window::drain`], with ranges they checked: `src` readable and `dst` writable for
/// `len` bytes, not overlapping.
fn parallel_copy(src: *const u8, dst: *mut u8, len: usize) {
    if len < PARALLEL_COPY_MIN {
        // SAFETY: see the function's contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        return;
    }
    let part = len.div_ceil(COPY_THREADS);
    // Addresses travel as integers (raw pointers are not `Send`); each thread copies its
    // own disjoint part.
    let (src, dst) = (src.expose_provenance(), dst.expose_provenance());
    std::thread::scope(|scope| {
        for i in 1..COPY_THREADS {
            let off = i * part;
            if off >= len {
                break;
            }
            let n = part.min(len - off);
            scope.spawn(move || {
                let (s, d) = (
                    std::ptr::with_exposed_provenance::<u8>(src + off),
                    std::ptr::with_exposed_provenance_mut::<u8>(dst + off),
                );
                // SAFETY: `[off, off + n)` is inside both ranges (function contract) and
                // disjoint from every other thread's part.
                unsafe { std::ptr::copy_nonoverlapping(s, d, n) };
            });
        }
        let (s, d) = (std::ptr::with_exposed_provenance::<u8>(src), std::ptr::with_exposed_provenance_mut::<u8>(dst));
        // SAFETY: the first part, as above.
        unsafe { std::ptr::copy_nonoverlapping(s, d, part.min(len)) };
    });
}
