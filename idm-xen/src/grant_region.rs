//! Grant pages as an `idm_core` [`SharedMemory`] region, on either side of a grant.

use crate::error::XenError;
use crate::gntalloc::GrantedPages;
use crate::gntdev::MappedGrants;
use idm_core::{RawRegion, SharedMemory};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Shared grant pages: the guest's [`GrantedPages`] or dom0's [`MappedGrants`]. Clones
/// share one mapping, released when the last clone is dropped. Every access goes through
/// `idm_core::RawRegion`'s atomics.
#[derive(Clone, Debug)]
pub struct GrantRegion {
    inner: Arc<Backing>,
}

#[derive(Debug)]
enum Backing {
    Granted(GrantedPages),
    Mapped(MappedGrants),
}

impl GrantRegion {
    /// The region as a raw region.
    pub fn raw(&self) -> &RawRegion {
        match &*self.inner {
            Backing::Granted(g) => g.region(),
            Backing::Mapped(m) => m.region().expect("GrantRegion only holds writable mappings"),
        }
    }
}

impl From<GrantedPages> for GrantRegion {
    fn from(g: GrantedPages) -> Self {
        GrantRegion { inner: Arc::new(Backing::Granted(g)) }
    }
}

impl TryFrom<MappedGrants> for GrantRegion {
    type Error = XenError;
    /// Fails for a read-only mapping: a channel writes its region.
    fn try_from(m: MappedGrants) -> Result<Self, XenError> {
        if m.region().is_none() {
            return Err(XenError::InvalidArgument("a GrantRegion needs a writable mapping"));
        }
        Ok(GrantRegion { inner: Arc::new(Backing::Mapped(m)) })
    }
}

impl SharedMemory for GrantRegion {
    #[inline]
    fn size(&self) -> usize {
        self.raw().size()
    }
    #[inline]
    fn load_u32(&self, offset: usize, order: Ordering) -> u32 {
        self.raw().load_u32(offset, order)
    }
    #[inline]
    fn store_u32(&self, offset: usize, value: u32, order: Ordering) {
        self.raw().store_u32(offset, value, order)
    }
    #[inline]
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) {
        self.raw().read_bytes(offset, dst)
    }
    #[inline]
    fn write_bytes(&self, offset: usize, src: &[u8]) {
        self.raw().write_bytes(offset, src)
    }
}
