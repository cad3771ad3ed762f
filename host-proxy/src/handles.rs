//! `HandleTable<T>`: opaque, generational, kind-tagged per-zone handles.
//!
//! A handle is `kind << 56 | generation << 32 | (slot + 1)`, with a 24-bit generation that
//! is never 0. Freeing a slot bumps its generation, so a stale handle (used after free, or
//! replayed) never names the slot's next occupant, and a forged value names nothing unless
//! it guesses kind, slot and generation of a live object *of the same zone* — tables are
//! per zone, so another zone's handles mean nothing here.
//!
//! The kind byte makes objects of different kinds unmistakable: a stream handle given
//! where an event is expected names nothing in the event table. Since the generation is
//! never 0, no handle is ever below `1 << 32`; in particular none is 0, 1 or 2, the values
//! CUDA gives the default streams ([`vgpu_proto::DEFAULT_STREAMS`]).

use vgpu_proto::Handle;

/// Generations are 24 bits wide (the top byte holds the kind).
const GENERATION_MASK: u32 = 0x00ff_ffff;

#[derive(Debug)]
enum Slot<T> {
    Live { generation: u32, value: T },
    Free { generation: u32, next_free: Option<u32> },
}

/// Why a handle operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// The handle names no live object of this zone (forged, stale, freed, foreign or of
    /// another kind).
    #[error("handle names no live object of this zone")]
    Invalid,
    /// The zone already holds its quota of handles.
    #[error("the zone already holds its quota of {0} handles")]
    QuotaExceeded(u32),
}

/// The kind byte of a handle value (its top byte).
pub fn kind_of(h: Handle) -> u8 {
    (h.0 >> 56) as u8
}

/// A table of objects of one kind addressed by generational handles, with a quota.
#[derive(Debug)]
pub struct HandleTable<T> {
    kind: u8,
    slots: Vec<Slot<T>>,
    free_head: Option<u32>,
    live: u32,
    max_live: u32,
}

impl<T> HandleTable<T> {
    /// An empty table for objects of `kind` (any non-zero byte; distinct per table of a
    /// zone) admitting at most `max_live` live objects.
    pub fn new(kind: u8, max_live: u32) -> Self {
        debug_assert_ne!(kind, 0, "kind 0 would make handles indistinguishable from untagged values");
        HandleTable { kind, slots: Vec::new(), free_head: None, live: 0, max_live }
    }

    /// The kind byte of this table's handles.
    pub fn kind(&self) -> u8 {
        self.kind
    }

    /// Number of live objects.
    pub fn len(&self) -> u32 {
        self.live
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    fn handle(&self, index: u32, generation: u32) -> Handle {
        Handle((u64::from(self.kind) << 56) | (u64::from(generation & GENERATION_MASK) << 32) | u64::from(index + 1))
    }

    /// Stores `value` and returns its new handle.
    pub fn insert(&mut self, value: T) -> Result<Handle, HandleError> {
        if self.live >= self.max_live {
            return Err(HandleError::QuotaExceeded(self.max_live));
        }
        let (index, generation) = match self.free_head {
            Some(i) => match self.slots.get(i as usize) {
                Some(&Slot::Free { generation, next_free }) => {
                    self.free_head = next_free;
                    (i, generation)
                }
                // The free list only ever points at free slots; refuse rather than panic.
                _ => return Err(HandleError::QuotaExceeded(self.max_live)),
            },
            None => {
                // max_live bounds live objects, and slots never outnumber the high-water mark
                // of live objects, so the index (and index + 1) fit in u32.
                let i = u32::try_from(self.slots.len())
                    .ok()
                    .filter(|i| *i < u32::MAX)
                    .ok_or(HandleError::QuotaExceeded(self.max_live))?;
                self.slots.push(Slot::Free { generation: 1, next_free: None });
                (i, 1)
            }
        };
        self.slots[index as usize] = Slot::Live { generation, value };
        self.live += 1;
        Ok(self.handle(index, generation))
    }

    fn index_of(&self, h: Handle) -> Option<(usize, u32)> {
        if kind_of(h) != self.kind {
            return None;
        }
        let index = (h.0 & 0xffff_ffff).checked_sub(1)? as usize;
        let generation = ((h.0 >> 32) as u32) & GENERATION_MASK;
        match self.slots.get(index)? {
            Slot::Live { generation: g, .. } if *g == generation => Some((index, generation)),
            _ => None,
        }
    }

    /// Whether `h` names a live object of this table.
    pub fn contains(&self, h: Handle) -> bool {
        self.index_of(h).is_some()
    }

    /// The object `h` names.
    pub fn get(&self, h: Handle) -> Result<&T, HandleError> {
        let (i, _) = self.index_of(h).ok_or(HandleError::Invalid)?;
        match self.slots.get(i) {
            Some(Slot::Live { value, .. }) => Ok(value),
            _ => Err(HandleError::Invalid),
        }
    }

    /// The object `h` names, mutably.
    pub fn get_mut(&mut self, h: Handle) -> Result<&mut T, HandleError> {
        let (i, _) = self.index_of(h).ok_or(HandleError::Invalid)?;
        match self.slots.get_mut(i) {
            Some(Slot::Live { value, .. }) => Ok(value),
            _ => Err(HandleError::Invalid),
        }
    }

    /// Removes and returns the object `h` names; `h` is dead from now on.
    pub fn remove(&mut self, h: Handle) -> Result<T, HandleError> {
        let (i, generation) = self.index_of(h).ok_or(HandleError::Invalid)?;
        // Generations wrap after 2^24 reuses of one slot; skipping 0 keeps every handle
        // at or above 1 << 32.
        let next_generation = match generation.wrapping_add(1) & GENERATION_MASK {
            0 => 1,
            g => g,
        };
        let old = std::mem::replace(
            &mut self.slots[i],
            Slot::Free { generation: next_generation, next_free: self.free_head },
        );
        self.free_head = Some(i as u32);
        self.live -= 1;
        match old {
            Slot::Live { value, .. } => Ok(value),
            Slot::Free { .. } => Err(HandleError::Invalid),
        }
    }

    /// Every live object with its handle.
    pub fn iter(&self) -> impl Iterator<Item = (Handle, &T)> + '_ {
        self.slots.iter().enumerate().filter_map(|(i, s)| match s {
            Slot::Live { generation, value } => Some((self.handle(i as u32, *generation), value)),
            Slot::Free { .. } => None,
        })
    }

    /// Removes every object for which `pred` holds, returning them with their (now dead)
    /// handles.
    pub fn remove_where(&mut self, mut pred: impl FnMut(Handle, &T) -> bool) -> Vec<(Handle, T)> {
        let doomed: Vec<Handle> = self.iter().filter(|(h, v)| pred(*h, v)).map(|(h, _)| h).collect();
        doomed.into_iter().filter_map(|h| self.remove(h).ok().map(|v| (h, v))).collect()
    }

    /// Removes every object, yielding them (for teardown). Handles issued before stay
    /// invalid: the generations of the emptied slots are kept.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.remove_where(|_, _| true).into_iter().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_forged_and_zero_handles_are_invalid() {
        let mut t = HandleTable::new(0x51, 8);
        let a = t.insert("a").unwrap();
        assert_eq!(t.get(a), Ok(&"a"));
        assert_eq!(t.remove(a), Ok("a"));
        assert_eq!(t.get(a), Err(HandleError::Invalid), "use after free");
        let b = t.insert("b").unwrap();
        assert_eq!(a.0 & 0xffff_ffff, b.0 & 0xffff_ffff, "slot reused");
        assert_ne!(a, b, "but with a new generation");
        assert_eq!(t.get(a), Err(HandleError::Invalid), "stale handle does not reach the new object");
        assert_eq!(t.remove(a), Err(HandleError::Invalid), "double free");
        for forged in [Handle(0), Handle(1), Handle(2), Handle(u64::MAX), Handle(b.0 + 1), Handle(b.0 ^ (1 << 40))] {
            assert_eq!(t.get(forged), Err(HandleError::Invalid), "{forged:?}");
        }
    }

    #[test]
    fn kinds_do_not_mix_and_no_handle_is_small() {
        let mut streams = HandleTable::new(0x51, 8);
        let mut events = HandleTable::new(0xe1, 8);
        let s = streams.insert(1).unwrap();
        let e = events.insert(2).unwrap();
        assert_eq!(kind_of(s), 0x51);
        assert_eq!(events.get(s), Err(HandleError::Invalid), "a stream is not an event");
        assert_eq!(streams.get(e), Err(HandleError::Invalid));
        // Same slot and generation, other kind: only the kind byte differs.
        assert_eq!(s.0 & ((1 << 56) - 1), e.0 & ((1 << 56) - 1));
        assert!(s.0 >= 1 << 32 && e.0 >= 1 << 32);
    }

    #[test]
    #[cfg_attr(miri, ignore = "2^24 reuses take hours under Miri; the_last_generation_wraps_to_one checks the wrap")]
    fn generations_wrap_without_reaching_zero() {
        let mut t = HandleTable::new(0x51, 1);
        let first = t.insert(()).unwrap();
        let mut last = first;
        for _ in 0..GENERATION_MASK {
            t.remove(last).unwrap();
            last = t.insert(()).unwrap();
            assert!(last.0 >= 1 << 32);
        }
        // 2^24 - 1 reuses later the generation is back at 1: the very first handle
        // names the slot again. (2^24 frees of one slot are needed to replay a handle.)
        assert_eq!(last, first);
    }

    /// The wrap of the test above from its last step, fast enough for Miri.
    #[test]
    fn the_last_generation_wraps_to_one() {
        let mut t = HandleTable::new(0x51, 1);
        let first = t.insert(()).unwrap();
        t.remove(first).unwrap();
        // Fast-forward the freed slot to the last generation, as 2^24 - 2 more reuses would.
        t.slots[0] = Slot::Free { generation: GENERATION_MASK, next_free: None };
        let last = t.insert(()).unwrap();
        assert_eq!((last.0 >> 32) & u64::from(GENERATION_MASK), u64::from(GENERATION_MASK));
        t.remove(last).unwrap();
        assert_eq!(t.insert(()).unwrap(), first, "generation 1 again, never 0");
    }

    #[test]
    fn freed_slots_are_reused_last_freed_first_and_values_are_dropped_once() {
        let value = std::rc::Rc::new(());
        let mut t = HandleTable::new(0x51, 4);
        let hs: Vec<Handle> = (0..4).map(|_| t.insert(value.clone()).unwrap()).collect();
        t.remove(hs[1]).unwrap();
        t.remove(hs[3]).unwrap();
        assert_eq!(std::rc::Rc::strong_count(&value), 3);
        let slot = |h: Handle| h.0 & 0xffff_ffff;
        assert_eq!(slot(t.insert(value.clone()).unwrap()), slot(hs[3]));
        assert_eq!(slot(t.insert(value.clone()).unwrap()), slot(hs[1]));
        assert_eq!(t.drain().count(), 4);
        assert_eq!(std::rc::Rc::strong_count(&value), 1, "every value dropped exactly once");
        drop(t);
        assert_eq!(std::rc::Rc::strong_count(&value), 1);
    }

    #[test]
    fn quota_is_enforced_and_freed_slots_count_again() {
        let mut t = HandleTable::new(0x51, 2);
        let a = t.insert(1).unwrap();
        t.insert(2).unwrap();
        assert_eq!(t.insert(3), Err(HandleError::QuotaExceeded(2)));
        t.remove(a).unwrap();
        t.insert(3).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.remove_where(|_, v| *v == 3).len(), 1);
        assert_eq!(t.iter().map(|(_, v)| *v).collect::<Vec<_>>(), vec![2]);
        assert_eq!(t.drain().collect::<Vec<_>>().len(), 1);
        assert!(t.is_empty());
    }
}
