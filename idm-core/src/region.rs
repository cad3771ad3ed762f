//! Access to memory that a peer may write at any moment.
//!
//! The rule (from rust-vmm's volatile memory): never form a Rust reference or slice into
//! peer-writable memory. All access goes through [`SharedMemory`], whose methods copy
//! bytes in or out with atomic (race-tolerant) loads and stores, so a concurrent write by
//! the peer can only change the *values* we copy, never make our program undefined.
//!
//! [`RawRegion`] implements the trait over a raw mapping (a grant mapping, a memfd mmap, a
//! heap buffer in tests); it is the only place in the crate with `unsafe`.

use core::sync::atomic::Ordering;

/// Memory shared with a peer, addressed by byte offset.
///
/// Offsets and lengths passed to these methods are computed and bounds-checked by this
/// crate, never taken from the peer; implementations may panic when a caller breaks the
/// contract, since that is a bug on our side and not something the peer can cause.
///
/// Contract: `offset + len <= self.size()`; `load_u32`/`store_u32` offsets are multiples
/// of 4.
pub trait SharedMemory {
    /// Size of the region in bytes.
    fn size(&self) -> usize;
    /// Atomically loads the little-endian-agnostic native `u32` at `offset`.
    fn load_u32(&self, offset: usize, order: Ordering) -> u32;
    /// Atomically stores a native `u32` at `offset`.
    fn store_u32(&self, offset: usize, value: u32, order: Ordering);
    /// Copies `dst.len()` bytes starting at `offset` out of the region.
    fn read_bytes(&self, offset: usize, dst: &mut [u8]);
    /// Copies `src` into the region starting at `offset`.
    fn write_bytes(&self, offset: usize, src: &[u8]);
}

impl<T: SharedMemory + ?Sized> SharedMemory for &T {
    fn size(&self) -> usize {
        (**self).size()
    }
    fn load_u32(&self, offset: usize, order: Ordering) -> u32 {
        (**self).load_u32(offset, order)
    }
    fn store_u32(&self, offset: usize, value: u32, order: Ordering) {
        (**self).store_u32(offset, value, order)
    }
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        (**self).read_bytes(offset, dst)
    }
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        (**self).write_bytes(offset, src)
    }
}

/// A window `[base, base + len)` of another region, itself a region.
#[derive(Clone, Copy, Debug)]
pub struct SubRegion<M> {
    mem: M,
    base: usize,
    len: usize,
}

/// Why a [`SubRegion`] could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct OutOfBounds;

impl<M: SharedMemory> SubRegion<M> {
    /// Makes the window `[base, base + len)` of `mem`; `base` must be 8-byte aligned so
    /// the window keeps the alignment of the region.
    pub fn new(mem: M, base: usize, len: usize) -> Result<Self, OutOfBounds> {
        let end = base.checked_add(len).ok_or(OutOfBounds)?;
        if end > mem.size() || base % 8 != 0 {
            return Err(OutOfBounds);
        }
        Ok(SubRegion { mem, base, len })
    }
}

impl<M: SharedMemory> SharedMemory for SubRegion<M> {
    fn size(&self) -> usize {
        self.len
    }
    fn load_u32(&self, offset: usize, order: Ordering) -> u32 {
        assert!(offset + 4 <= self.len, "SubRegion::load_u32 out of bounds");
        self.mem.load_u32(self.base + offset, order)
    }
    fn store_u32(&self, offset: usize, value: u32, order: Ordering) {
        assert!(offset + 4 <= self.len, "SubRegion::store_u32 out of bounds");
        self.mem.store_u32(self.base + offset, value, order)
    }
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= self.len, "SubRegion::read_bytes out of bounds");
        self.mem.read_bytes(self.base + offset, dst)
    }
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        assert!(offset + src.len() <= self.len, "SubRegion::write_bytes out of bounds");
        self.mem.write_bytes(self.base + offset, src)
    }
}

pub use raw::RawRegion;

#[allow(unsafe_code)]
mod raw {
    use super::SharedMemory;
    use core::ptr::NonNull;
    use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

    /// A region of raw memory mapped into this address space and shared with a peer.
    ///
    /// Every access is atomic: word-sized relaxed atomics for bulk copies, so a peer's
    /// concurrent writes are data, not undefined behaviour.
    #[derive(Debug)]
    pub struct RawRegion {
        base: NonNull<u8>,
        len: usize,
    }

    // SAFETY: the region is only ever accessed through atomic operations, which are safe
    // to perform from any thread; `RawRegion` holds no thread-affine state.
    unsafe impl Send for RawRegion {}
    // SAFETY: as above: shared access from several threads is atomic access.
    unsafe impl Sync for RawRegion {}

    impl RawRegion {
        /// Wraps `len` bytes at `base`.
        ///
        /// # Safety
        /// `base` must be aligned to 8 bytes and valid for reads and writes of `len`
        /// bytes for as long as the `RawRegion` (and anything borrowing it) lives, and
        /// the memory must only be accessed atomically or by other processes/domains
        /// (never through Rust references) during that time.
        pub unsafe fn new(base: NonNull<u8>, len: usize) -> Self {
            assert!(base.as_ptr() as usize % 8 == 0, "RawRegion base must be 8-byte aligned");
            RawRegion { base, len }
        }

        /// The base address, for transports that must hand it to the kernel (futex).
        pub fn as_ptr(&self) -> *mut u8 {
            self.base.as_ptr()
        }

        /// The address of byte `offset`; in bounds whenever the caller checked `offset`.
        /// `wrapping_add` keeps the arithmetic itself safe; validity is the caller's check.
        fn ptr_at(&self, offset: usize) -> *mut u8 {
            self.base.as_ptr().wrapping_add(offset)
        }

        fn check(&self, offset: usize, len: usize) {
            let end = offset.checked_add(len);
            assert!(matches!(end, Some(e) if e <= self.len), "RawRegion access out of bounds");
        }

        fn byte(&self, offset: usize) -> &AtomicU8 {
            // SAFETY: `offset` was bounds-checked by the caller via `check`, the region is
            // valid for the lifetime of `self` (constructor contract), and every access to
            // it is atomic, so an `AtomicU8` view of one byte is sound.
            unsafe { AtomicU8::from_ptr(self.ptr_at(offset)) }
        }

        fn word32(&self, offset: usize) -> &AtomicU32 {
            debug_assert!((self.base.as_ptr() as usize + offset) % 4 == 0);
            // SAFETY: in bounds (checked by caller), 4-byte aligned (the caller has just
            // finished 8-byte words from an aligned base), valid for `self`'s lifetime, and
            // only accessed atomically.
            unsafe { AtomicU32::from_ptr(self.ptr_at(offset).cast::<u32>()) }
        }

        fn word64(&self, offset: usize) -> &AtomicU64 {
            debug_assert!((self.base.as_ptr() as usize + offset) % 8 == 0);
            // SAFETY: in bounds (checked by caller), 8-byte aligned (asserted above from
            // the aligned base and an aligned offset), valid for `self`'s lifetime, and
            // only accessed atomically.
            unsafe { AtomicU64::from_ptr(self.ptr_at(offset).cast::<u64>()) }
        }
    }

    impl SharedMemory for RawRegion {
        fn size(&self) -> usize {
            self.len
        }

        fn load_u32(&self, offset: usize, order: Ordering) -> u32 {
            self.check(offset, 4);
            assert!(offset % 4 == 0, "unaligned u32 access");
            // SAFETY: bounds and alignment checked just above; valid and atomically
            // accessed for `self`'s lifetime (constructor contract).
            let a = unsafe { AtomicU32::from_ptr(self.ptr_at(offset).cast::<u32>()) };
            a.load(order)
        }

        fn store_u32(&self, offset: usize, value: u32, order: Ordering) {
            self.check(offset, 4);
            assert!(offset % 4 == 0, "unaligned u32 access");
            // SAFETY: as in `load_u32`.
            let a = unsafe { AtomicU32::from_ptr(self.ptr_at(offset).cast::<u32>()) };
            a.store(value, order)
        }

        fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
            self.check(offset, dst.len());
            let mut i = 0;
            while i < dst.len() && (offset + i) % 8 != 0 {
                dst[i] = self.byte(offset + i).load(Ordering::Relaxed);
                i += 1;
            }
            while dst.len() - i >= 8 {
                let w = self.word64(offset + i).load(Ordering::Relaxed);
                dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
                i += 8;
            }
            // A 4-byte tail (a ring slot's 60 payload bytes end in one) in one access.
            if dst.len() - i >= 4 {
                let w = self.word32(offset + i).load(Ordering::Relaxed);
                dst[i..i + 4].copy_from_slice(&w.to_ne_bytes());
                i += 4;
            }
            while i < dst.len() {
                dst[i] = self.byte(offset + i).load(Ordering::Relaxed);
                i += 1;
            }
        }

        fn write_bytes(&self, offset: usize, src: &[u8]) {
            self.check(offset, src.len());
            let mut i = 0;
            while i < src.len() && (offset + i) % 8 != 0 {
                self.byte(offset + i).store(src[i], Ordering::Relaxed);
                i += 1;
            }
            while src.len() - i >= 8 {
                let mut w = [0u8; 8];
                w.copy_from_slice(&src[i..i + 8]);
                self.word64(offset + i).store(u64::from_ne_bytes(w), Ordering::Relaxed);
                i += 8;
            }
            if src.len() - i >= 4 {
                let mut w = [0u8; 4];
                w.copy_from_slice(&src[i..i + 4]);
                self.word32(offset + i).store(u32::from_ne_bytes(w), Ordering::Relaxed);
                i += 4;
            }
            while i < src.len() {
                self.byte(offset + i).store(src[i], Ordering::Relaxed);
                i += 1;
            }
        }
    }
}

/// Test doubles: heap memory standing in for a shared page.
#[cfg(any(test, feature = "test-utils"))]
#[allow(unsafe_code)]
pub mod test_utils {
    extern crate std;
    use super::RawRegion;
    use core::ptr::NonNull;
    use std::vec;
    use std::vec::Vec;

    /// Allocates `bytes` of zeroed, 8-byte aligned heap memory and a region over it. Keep
    /// the returned `Vec` alive as long as the region (drop the region first).
    pub fn heap_region(bytes: usize) -> (Vec<u64>, RawRegion) {
        let mut v = vec![0u64; bytes.div_ceil(8)];
        let ptr = NonNull::new(v.as_mut_ptr().cast::<u8>()).expect("Vec pointer is non-null");
        // SAFETY: the Vec's buffer is 8-byte aligned, `bytes` long or longer, and is only
        // accessed through the region while the caller keeps the Vec alive (documented
        // above); moving a Vec does not move its heap buffer.
        let region = unsafe { RawRegion::new(ptr, bytes) };
        (v, region)
    }
}
