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

/// The arena's bookkeeping in window offsets: which page-aligned ranges between the
/// staging area and the window's end are taken, and with which flags. It touches no
/// memory ([`Window`] turns offsets into addresses), so its tests run under Miri.
#[derive(Debug)]
struct Arena {
    /// The first offset after the staging area (page-aligned).
    start: u64,
    /// The window's size: no block reaches past it.
    end: u64,
    /// Blocks by their start offset; they never overlap.
    blocks: BTreeMap<u64, Block>,
}

impl Arena {
    /// The arena of a window of `size` bytes whose first `staging` bytes are not in it.
    fn new(staging: u64, size: u64) -> Arena {
        Arena { start: staging.next_multiple_of(ALIGN), end: size, blocks: BTreeMap::new() }
    }

    /// The offset of a new block of `len` bytes (page-aligned, first fit).
    fn alloc(&mut self, len: u64, flags: u32) -> CuResult<u64> {
        if len == 0 {
            return Err(CuError::INVALID_VALUE);
        }
        let need = len.checked_next_multiple_of(ALIGN).ok_or(CuError::OUT_OF_MEMORY)?;
        let mut start = self.start;
        for (&off, b) in &self.blocks {
            if off.saturating_sub(start) >= need {
                break;
            }
            start = (off + b.len).next_multiple_of(ALIGN);
        }
        if start.checked_add(need).is_none_or(|end| end > self.end) {
            return Err(CuError::OUT_OF_MEMORY);
        }
        self.blocks.insert(start, Block { len, flags });
        Ok(start)
    }

    /// Frees the block that starts at `off`.
    fn free(&mut self, off: u64) -> CuResult<()> {
        self.blocks.remove(&off).map(drop).ok_or(CuError::INVALID_VALUE)
    }

    /// The block holding offset `off`: its start and what it is.
    fn block_at(&self, off: u64) -> Option<(u64, Block)> {
        let (&start, &b) = self.blocks.range(..=off).next_back()?;
        (off < start + b.len).then_some((start, b))
    }

    /// `[off, off + len)` when it lies inside one block (an empty range may start at the
    /// block's end).
    fn range(&self, off: u64, len: u64) -> Option<BulkRef> {
        let (&start, b) = self.blocks.range(..=off).next_back()?;
        (off.checked_add(len)? <= start + b.len).then_some(BulkRef { offset: off, len })
    }
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
    arena: Arena,
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
        let size = layout.window_size() as u64;
        Window {
            data,
            region,
            region_offset: layout.window_offset() as u64,
            base,
            size,
            arena: Arena::new(staging_len(size), size),
            adopted: BTreeMap::new(),
        }
    }

    /// Bytes available for staging one chunk of a pageable copy.
    pub fn staging_len(&self) -> u64 {
        staging_len(self.size)
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

    /// Reads bytes at a window offset (a linked image the host wrote into a temporary block).
    pub fn read_at(&self, desc: BulkRef, dst: &mut [u8]) -> CuResult<()> {
        self.data.read(desc, dst).map_err(|_| CuError::INVALID_VALUE)
    }

    /// Carves `len` bytes (page-aligned) out of the arena.
    pub fn alloc(&mut self, len: u64, flags: u32) -> CuResult<*mut u8> {
        let off = self.arena.alloc(len, flags)?;
        Ok(self.base.wrapping_add(off as usize))
    }

    /// Returns a block made by [`alloc`](Self::alloc); `p` must be its start.
    pub fn free(&mut self, p: *const u8) -> CuResult<()> {
        let off = self.offset_of(p).ok_or(CuError::INVALID_VALUE)?;
        self.arena.free(off)
    }

    /// The flags a block was allocated with, for any address inside it.
    pub fn flags_of(&self, p: *const u8) -> Option<u32> {
        Some(self.arena.block_at(self.offset_of(p)?)?.1.flags)
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
        self.arena.range(self.offset_of(p)?, len)
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

/// Bytes available for staging in a window of `size` bytes.
fn staging_len(size: u64) -> u64 {
    STAGING.min(size)
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
    let whole = CopyPart { src, dst, len };
    if len < PARALLEL_COPY_MIN {
        // SAFETY: see the function's contract.
        unsafe { whole.copy() };
        return;
    }
    let part = len.div_ceil(COPY_THREADS);
    std::thread::scope(|scope| {
        for i in 1..COPY_THREADS {
            let off = i * part;
            if off >= len {
                break;
            }
            let p = CopyPart { src: src.wrapping_add(off), dst: dst.wrapping_add(off), len: part.min(len - off) };
            scope.spawn(move || {
                // SAFETY: `[off, off + p.len)` is inside both ranges (function contract) and
                // disjoint from every other thread's part.
                unsafe { p.copy() }
            });
        }
        // SAFETY: the first part, as above.
        unsafe { CopyPart { len: part.min(len), ..whole }.copy() };
    });
}

/// One thread's part of a [`parallel_copy`]. The pointers keep their provenance (Miri
/// checks every access against the ranges they came from), and a part may be sent to
/// another thread, which raw pointers alone may not.
#[derive(Clone, Copy)]
struct CopyPart {
    src: *const u8,
    dst: *mut u8,
    len: usize,
}

// SAFETY: a part names memory that outlives the scoped thread copying it (the caller's
// ranges) and that no other part touches; sending it hands that piece to one thread.
unsafe impl Send for CopyPart {}

impl CopyPart {
    /// # Safety
    /// `src` must be readable and `dst` writable for `len` bytes, not overlapping, and no
    /// other thread may access `dst`'s bytes meanwhile.
    unsafe fn copy(self) {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(self.src, self.dst, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = ALIGN;

    #[test]
    fn blocks_are_page_aligned_first_fit_after_the_staging_area() {
        let mut a = Arena::new(100, 5 * PAGE);
        assert_eq!(a.alloc(1, 1), Ok(PAGE), "the arena starts at the page after staging");
        assert_eq!(a.alloc(PAGE + 1, 2), Ok(2 * PAGE));
        assert_eq!(a.alloc(PAGE, 3), Ok(4 * PAGE));
        assert_eq!(a.alloc(1, 4), Err(CuError::OUT_OF_MEMORY));
        assert_eq!(a.free(2 * PAGE), Ok(()));
        assert_eq!(a.alloc(PAGE, 5), Ok(2 * PAGE), "the first gap that fits");
        assert_eq!(a.alloc(PAGE, 6), Ok(3 * PAGE));
        assert_eq!(a.alloc(1, 7), Err(CuError::OUT_OF_MEMORY));
    }

    #[test]
    fn sizes_that_cannot_fit_are_refused() {
        let mut a = Arena::new(STAGING, STAGING + 2 * PAGE);
        assert_eq!(a.alloc(0, 0), Err(CuError::INVALID_VALUE));
        for len in [u64::MAX, u64::MAX - PAGE, 3 * PAGE, 2 * PAGE + 1] {
            assert_eq!(a.alloc(len, 0), Err(CuError::OUT_OF_MEMORY), "{len}");
        }
        assert_eq!(a.alloc(2 * PAGE, 0), Ok(STAGING));
        // A window no larger than the staging area has no arena.
        let size = STAGING / 2;
        assert_eq!(Arena::new(staging_len(size), size).alloc(1, 0), Err(CuError::OUT_OF_MEMORY));
    }

    #[test]
    fn lookups_stay_inside_one_block() {
        let mut a = Arena::new(0, 8 * PAGE);
        let b = a.alloc(100, 7).unwrap();
        let c = a.alloc(PAGE, 8).unwrap();
        assert_eq!(c, b + PAGE, "the rest of b's page is not c's");
        assert_eq!(a.block_at(b + 99).map(|(s, k)| (s, k.flags)), Some((b, 7)));
        assert!(a.block_at(b + 100).is_none(), "past b's length, before c");
        assert_eq!(a.block_at(c + PAGE - 1).map(|(s, _)| s), Some(c));
        assert!(a.block_at(c + PAGE).is_none());
        assert_eq!(a.range(b + 10, 90), Some(BulkRef { offset: b + 10, len: 90 }));
        assert_eq!(a.range(b + 100, 0), Some(BulkRef { offset: b + 100, len: 0 }));
        assert_eq!(a.range(b + 10, 91), None);
        assert_eq!(a.range(b + 10, u64::MAX), None);
        assert_eq!(a.free(b + 1), Err(CuError::INVALID_VALUE), "not a block's start");
        assert_eq!(a.free(b), Ok(()));
        assert_eq!(a.free(b), Err(CuError::INVALID_VALUE), "freed twice");
        assert!(a.block_at(b).is_none() && a.range(b, 1).is_none());
    }

    /// Random allocations and frees (a fixed-seed generator) keep every block aligned,
    /// inside the arena and apart from the others, and a refusal means no gap fits.
    #[test]
    fn blocks_never_overlap_and_refusals_are_honest() {
        const END: u64 = STAGING + 64 * PAGE;
        let mut a = Arena::new(STAGING, END);
        let mut live: Vec<(u64, u64)> = Vec::new();
        let (mut frees, mut refusals) = (0, 0);
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..300 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            if seed % 3 == 0 && !live.is_empty() {
                let (off, _) = live.swap_remove((seed / 3) as usize % live.len());
                assert_eq!(a.free(off), Ok(()));
                frees += 1;
                continue;
            }
            let len = 1 + (seed >> 8) % (6 * PAGE);
            match a.alloc(len, 0) {
                Ok(off) => {
                    assert!(off % PAGE == 0 && off >= STAGING && off + len <= END, "{off} {len}");
                    assert!(live.iter().all(|&(o, l)| off + len <= o || o + l <= off), "{off} {len} {live:?}");
                    live.push((off, len));
                }
                Err(e) => {
                    assert_eq!(e, CuError::OUT_OF_MEMORY);
                    live.sort_unstable();
                    let mut at = STAGING;
                    for &(o, l) in live.iter().chain(&[(END, 0)]) {
                        assert!(o - at < len.next_multiple_of(PAGE), "the gap at {at} fits {len}: {live:?}");
                        at = (o + l).next_multiple_of(PAGE);
                    }
                    refusals += 1;
                }
            }
        }
        assert!(frees > 0 && refusals > 0, "the sequence tried both ({frees} frees, {refusals} refusals)");
    }

    /// Copies `len` bytes into the middle of a guarded buffer and checks them and the guards.
    fn check_copy(len: usize) {
        let src = [0x01u8, 0x02, 0x03, 0x05, 0x07, 0x0b, 0x0d].repeat(len.div_ceil(7))[..len].to_vec();
        let mut dst = vec![0xa5u8; len + 128];
        parallel_copy(src.as_ptr(), dst[64..].as_mut_ptr(), len);
        assert!(dst[..64].iter().chain(&dst[64 + len..]).all(|&b| b == 0xa5), "a guard byte was written");
        assert!(dst[64..64 + len] == src[..], "{len} bytes");
    }

    #[test]
    fn small_copies_are_exact() {
        for len in [0, 1, 7, 4096, 4097] {
            check_copy(len);
        }
    }

    /// Above the threshold the copy is split between threads; the parts must cover the
    /// range exactly, whatever its remainder by the number of threads.
    #[test]
    fn parallel_copies_are_exact() {
        check_copy(PARALLEL_COPY_MIN);
        check_copy(PARALLEL_COPY_MIN + COPY_THREADS + 1);
    }
}
