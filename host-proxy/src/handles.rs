//! `HandleTable<T>`: opaque, generational per-zone handles.
//!
//! A handle is `generation << 32 | (slot + 1)`. Freeing a slot bumps its generation, so a
//! stale handle (used after free, or replayed) never names the slot's next occupant, and a
//! forged value names nothing unless it guesses both slot and generation of a live object
//! *of the same zone* — tables are per zone, so another zone's handles mean nothing here.

use vgpu_proto::Handle;

#[derive(Debug)]
enum Slot<T> {
    Live { generation: u32, value: T },
    Free { generation: u32, next_free: Option<u32> },
}

/// Why a handle operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// The handle names no live object of this zone (forged, stale, freed or foreign).
    #[error("handle names no live object of this zone")]
    Invalid,
    /// The zone already holds its quota of handles.
    #[error("the zone already holds its quota of {0} handles")]
    QuotaExceeded(u32),
}

/// A table of objects addressed by generational handles, with a capacity quota.
#[derive(Debug)]
pub struct HandleTable<T> {
    slots: Vec<Slot<T>>,
    free_head: Option<u32>,
    live: u32,
    max_live: u32,
}

impl<T> HandleTable<T> {
    /// An empty table admitting at most `max_live` live objects.
    pub fn new(max_live: u32) -> Self {
        HandleTable { slots: Vec::new(), free_head: None, live: 0, max_live }
    }

    /// Number of live objects.
    pub fn len(&self) -> u32 {
        self.live
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Stores `value` and returns its new handle.
    pub fn insert(&mut self, value: T) -> Result<Handle, HandleError> {
        if self.live >= self.max_live {
            return Err(HandleError::QuotaExceeded(self.max_live));
        }
        let (index, generation) = match self.free_head {
            Some(i) => {
                let Slot::Free { generation, next_free } = self.slots[i as usize] else {
                    unreachable!("free list points at a live slot")
                };
                self.free_head = next_free;
                (i, generation)
            }
            None => {
                // max_live bounds live objects, and slots never outnumber the high-water mark
                // of live objects, so this cannot exceed u32.
                let i = u32::try_from(self.slots.len()).map_err(|_| HandleError::QuotaExceeded(self.max_live))?;
                self.slots.push(Slot::Free { generation: 1, next_free: None });
                (i, 1)
            }
        };
        self.slots[index as usize] = Slot::Live { generation, value };
        self.live += 1;
        Ok(Handle((u64::from(generation) << 32) | u64::from(index + 1)))
    }

    fn index_of(&self, h: Handle) -> Option<(usize, u32)> {
        let index = (h.0 & 0xffff_ffff).checked_sub(1)? as usize;
        let generation = (h.0 >> 32) as u32;
        match self.slots.get(index)? {
            Slot::Live { generation: g, .. } if *g == generation => Some((index, generation)),
            _ => None,
        }
    }

    /// The object `h` names.
    pub fn get(&self, h: Handle) -> Result<&T, HandleError> {
        let (i, _) = self.index_of(h).ok_or(HandleError::Invalid)?;
        match &self.slots[i] {
            Slot::Live { value, .. } => Ok(value),
            Slot::Free { .. } => Err(HandleError::Invalid),
        }
    }

    /// Removes and returns the object `h` names; `h` is dead from now on.
    pub fn remove(&mut self, h: Handle) -> Result<T, HandleError> {
        let (i, generation) = self.index_of(h).ok_or(HandleError::Invalid)?;
        // Generations wrap after 2^32 reuses of one slot; skipping 0 keeps handle 0 invalid.
        let next_generation = generation.wrapping_add(1).max(1);
        let old = std::mem::replace(
            &mut self.slots[i],
            Slot::Free { generation: next_generation, next_free: self.free_head },
        );
        self.free_head = Some(i as u32);
        self.live -= 1;
        match old {
            Slot::Live { value, .. } => Ok(value),
            Slot::Free { .. } => unreachable!("index_of only returns live slots"),
        }
    }

    /// Removes every object, yielding them (for teardown).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.free_head = None;
        self.live = 0;
        self.slots.drain(..).filter_map(|s| match s {
            Slot::Live { value, .. } => Some(value),
            Slot::Free { .. } => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_forged_and_zero_handles_are_invalid() {
        let mut t = HandleTable::new(8);
        let a = t.insert("a").unwrap();
        assert_eq!(t.get(a), Ok(&"a"));
        assert_eq!(t.remove(a), Ok("a"));
        assert_eq!(t.get(a), Err(HandleError::Invalid), "use after free");
        let b = t.insert("b").unwrap();
        assert_eq!(a.0 & 0xffff_ffff, b.0 & 0xffff_ffff, "slot reused");
        assert_ne!(a, b, "but with a new generation");
        assert_eq!(t.get(a), Err(HandleError::Invalid), "stale handle does not reach the new object");
        assert_eq!(t.remove(a), Err(HandleError::Invalid), "double free");
        for forged in [Handle(0), Handle(u64::MAX), Handle(b.0 + 1), Handle(b.0 ^ (1 << 40))] {
            assert_eq!(t.get(forged), Err(HandleError::Invalid), "{forged:?}");
        }
    }

    #[test]
    fn quota_is_enforced_and_freed_slots_count_again() {
        let mut t = HandleTable::new(2);
        let a = t.insert(1).unwrap();
        t.insert(2).unwrap();
        assert_eq!(t.insert(3), Err(HandleError::QuotaExceeded(2)));
        t.remove(a).unwrap();
        t.insert(3).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.drain().collect::<Vec<_>>().len(), 2);
        assert!(t.is_empty());
    }
}
