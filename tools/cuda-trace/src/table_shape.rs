//! How many slots an export table has. `cuGetExportTable` does not say, so it is decided
//! from the table itself: when slot 0 is a small multiple of 8 it is taken as the table's
//! size in bytes (slot 0 included), which is how most of the driver's tables begin;
//! otherwise the table is scanned while its slots are code pointers or null.

use std::fmt;

/// The largest slot-0 value taken as a size in bytes.
pub(crate) const MAX_SIZE_FIELD: u64 = 4096;

/// How many slots a scan reads at most.
pub(crate) const MAX_SCAN_SLOTS: usize = 64;

/// How the length was decided (logged as `how=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum How {
    /// Slot 0 held the size in bytes.
    SizeField(u64),
    /// Slot 0 held the size in bytes, but the table was unreadable from this slot on.
    SizeFieldCut(u64, usize),
    /// A scan stopped at this slot, which is neither null nor code.
    ScanNonCode(usize),
    /// A scan stopped at this slot, which is not readable.
    ScanUnreadable(usize),
    /// A scan reached the bound without a reason to stop.
    ScanBound(usize),
}

impl fmt::Display for How {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            How::SizeField(bytes) => write!(f, "size-field:{bytes}"),
            How::SizeFieldCut(bytes, at) => write!(f, "size-field:{bytes}:unreadable-at:{at}"),
            How::ScanNonCode(at) => write!(f, "scan:non-code-at:{at}"),
            How::ScanUnreadable(at) => write!(f, "scan:unreadable-at:{at}"),
            How::ScanBound(bound) => write!(f, "scan:bound:{bound}"),
        }
    }
}

/// A table's slots as read, and how their number was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shape {
    /// The values of the slots that belong to the table.
    pub slots: Vec<u64>,
    /// How their number was decided.
    pub how: How,
}

/// Decides a table's length. `read(k)` gives slot `k`, or `None` when it is not readable;
/// `is_code(v)` says whether `v` points into the driver's code.
pub(crate) fn decide(mut read: impl FnMut(usize) -> Option<u64>, is_code: impl Fn(u64) -> bool) -> Shape {
    let Some(first) = read(0) else { return Shape { slots: Vec::new(), how: How::ScanUnreadable(0) } };
    if first != 0 && first % 8 == 0 && first <= MAX_SIZE_FIELD {
        let len = (first / 8) as usize;
        let mut slots = vec![first];
        for k in 1..len {
            match read(k) {
                Some(v) => slots.push(v),
                None => return Shape { slots, how: How::SizeFieldCut(first, k) },
            }
        }
        return Shape { slots, how: How::SizeField(first) };
    }
    let mut slots = Vec::new();
    let mut value = Some(first);
    for k in 0..MAX_SCAN_SLOTS {
        if k > 0 {
            value = read(k);
        }
        match value {
            None => return Shape { slots, how: How::ScanUnreadable(k) },
            Some(v) if v == 0 || is_code(v) => slots.push(v),
            Some(_) => return Shape { slots, how: How::ScanNonCode(k) },
        }
    }
    Shape { slots, how: How::ScanBound(MAX_SCAN_SLOTS) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CODE: u64 = 0x7f00_0000_0000;

    fn is_code(v: u64) -> bool {
        (CODE..CODE + 0x1000).contains(&v)
    }

    fn shape(table: &[u64]) -> Shape {
        decide(|k| table.get(k).copied(), is_code)
    }

    #[test]
    fn a_small_multiple_of_eight_in_slot_0_is_the_size_in_bytes() {
        let s = shape(&[40, CODE, CODE + 8, 0x1234, CODE + 16, CODE + 24]);
        assert_eq!(s.how, How::SizeField(40));
        assert_eq!(s.slots, vec![40, CODE, CODE + 8, 0x1234, CODE + 16]);
        assert_eq!(s.how.to_string(), "size-field:40");
    }

    #[test]
    fn a_size_beyond_readable_memory_is_cut() {
        let s = shape(&[32, CODE]);
        assert_eq!(s.how, How::SizeFieldCut(32, 2));
        assert_eq!(s.slots.len(), 2);
    }

    #[test]
    fn without_a_size_the_scan_stops_at_the_first_data_slot() {
        let s = shape(&[CODE, 0, CODE + 8, 0x5555_0000_1234, CODE]);
        assert_eq!(s.how, How::ScanNonCode(3));
        assert_eq!(s.slots, vec![CODE, 0, CODE + 8]);
        // Not a size: not a multiple of 8, or too large, or zero.
        assert_eq!(shape(&[12, CODE]).how, How::ScanNonCode(0));
        assert_eq!(shape(&[8192, CODE]).how, How::ScanNonCode(0));
        assert_eq!(shape(&[0, CODE, 7]).how, How::ScanNonCode(2));
    }

    #[test]
    fn the_scan_stops_at_unreadable_memory_and_at_its_bound() {
        assert_eq!(shape(&[CODE, CODE]).how, How::ScanUnreadable(2));
        assert_eq!(shape(&[]).how, How::ScanUnreadable(0));
        let long = vec![CODE; 100];
        let s = shape(&long);
        assert_eq!(s.how, How::ScanBound(MAX_SCAN_SLOTS));
        assert_eq!(s.slots.len(), MAX_SCAN_SLOTS);
        assert_eq!(s.how.to_string(), "scan:bound:64");
    }
}
