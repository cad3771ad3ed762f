//! Bulk data: descriptors into a shared data window.
//!
//! Large payloads (memcpy data) never stream through the message ring. The sender places
//! them in a data window both sides map and sends a [`BulkRef`] `(offset, len)` in the
//! message. The receiver validates the descriptor against the window's bounds with
//! overflow-checked arithmetic before touching a byte; the window is peer-writable memory
//! like the ring, so it is only ever accessed by copying through [`SharedMemory`].

use crate::region::SharedMemory;
use serde::{Deserialize, Serialize};

/// A byte range of the shared data window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BulkRef {
    /// Offset from the window's start.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Why a descriptor was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum BulkError {
    /// `offset + len` overflows or lies past the end of the window.
    OutOfBounds {
        /// The offending descriptor.
        desc: BulkRef,
        /// Window size.
        window: u64,
    },
    /// The local buffer's length differs from the descriptor's.
    LengthMismatch,
}

impl core::fmt::Display for BulkError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BulkError::OutOfBounds { desc, window } => write!(
                f,
                "bulk descriptor (offset {}, len {}) lies outside the {window}-byte data window",
                desc.offset, desc.len
            ),
            BulkError::LengthMismatch => {
                write!(f, "buffer length does not match the bulk descriptor")
            }
        }
    }
}

impl core::error::Error for BulkError {}

/// The shared data window.
#[derive(Debug)]
pub struct DataWindow<M> {
    mem: M,
}

impl<M> DataWindow<M> {
    /// The same window, its memory wrapped by `f` (which must give access to the same bytes).
    pub fn map_memory<M2>(self, f: impl FnOnce(M) -> M2) -> DataWindow<M2> {
        DataWindow { mem: f(self.mem) }
    }
}

impl<M: SharedMemory> DataWindow<M> {
    /// Wraps the window's memory.
    pub fn new(mem: M) -> Self {
        DataWindow { mem }
    }

    /// Window size in bytes.
    pub fn size(&self) -> usize {
        self.mem.size()
    }

    /// The underlying memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Validates `desc` against the window; returns `(offset, len)` as `usize`.
    pub fn check(&self, desc: BulkRef) -> Result<(usize, usize), BulkError> {
        let window = self.mem.size() as u64;
        match desc.offset.checked_add(desc.len) {
            Some(end) if end <= window => Ok((desc.offset as usize, desc.len as usize)),
            _ => Err(BulkError::OutOfBounds { desc, window }),
        }
    }

    /// Copies the described bytes out of the window into `dst` (once).
    pub fn read(&self, desc: BulkRef, dst: &mut [u8]) -> Result<(), BulkError> {
        let (off, len) = self.check(desc)?;
        if dst.len() != len {
            return Err(BulkError::LengthMismatch);
        }
        self.mem.read_bytes(off, dst);
        Ok(())
    }

    /// Copies `src` into the described bytes of the window.
    pub fn write(&self, desc: BulkRef, src: &[u8]) -> Result<(), BulkError> {
        let (off, len) = self.check(desc)?;
        if src.len() != len {
            return Err(BulkError::LengthMismatch);
        }
        self.mem.write_bytes(off, src);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::test_utils::heap_region;

    #[test]
    fn descriptors_are_bounds_checked_without_overflow() {
        let (_b, region) = heap_region(4096);
        let w = DataWindow::new(&region);
        assert_eq!(w.check(BulkRef { offset: 0, len: 4096 }), Ok((0, 4096)));
        assert_eq!(w.check(BulkRef { offset: 4096, len: 0 }), Ok((4096, 0)));
        for bad in [
            BulkRef { offset: 4095, len: 2 },
            BulkRef { offset: u64::MAX, len: 2 },
            BulkRef { offset: 1, len: u64::MAX },
        ] {
            assert_eq!(w.check(bad), Err(BulkError::OutOfBounds { desc: bad, window: 4096 }));
        }
    }

    #[test]
    fn write_then_read_round_trips() {
        let (_b, region) = heap_region(4096);
        let w = DataWindow::new(&region);
        let desc = BulkRef { offset: 13, len: 100 };
        let data: [u8; 100] = core::array::from_fn(|i| i as u8);
        w.write(desc, &data).unwrap();
        let mut out = [0u8; 100];
        w.read(desc, &mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(w.read(desc, &mut out[..99]), Err(BulkError::LengthMismatch));
    }
}
