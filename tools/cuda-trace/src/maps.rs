//! The process's memory map, from `/proc/self/maps`: which addresses may be read, and which
//! lie in the real driver's code (how export-table slots are told from data).

/// One mapping of `/proc/self/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapping {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Whether it is readable.
    pub read: bool,
    /// Whether it is executable.
    pub exec: bool,
    /// The mapped file, empty for anonymous memory.
    pub path: String,
}

impl Mapping {
    fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// The map at one moment.
#[derive(Debug, Default)]
pub(crate) struct MemoryMap {
    mappings: Vec<Mapping>,
}

impl MemoryMap {
    /// Reads `/proc/self/maps`; an unreadable map is empty (nothing counts as readable).
    pub(crate) fn current() -> MemoryMap {
        MemoryMap::parse(&std::fs::read_to_string("/proc/self/maps").unwrap_or_default())
    }

    /// Parses the text of a `maps` file; lines it does not understand are skipped.
    pub(crate) fn parse(text: &str) -> MemoryMap {
        MemoryMap { mappings: text.lines().filter_map(parse_line).collect() }
    }

    /// Whether all of `[addr, addr + len)` is mapped readable.
    pub(crate) fn readable(&self, addr: u64, len: u64) -> bool {
        let Some(last) = addr.checked_add(len.saturating_sub(1)) else { return false };
        let mut at = addr;
        // Adjacent mappings may split the range.
        loop {
            match self.mappings.iter().find(|m| m.read && m.contains(at)) {
                Some(m) if last < m.end => return true,
                Some(m) => at = m.end,
                None => return false,
            }
        }
    }

    /// The executable ranges of the file that holds `code` (a known function of the real
    /// driver), or none when `code` is not in a file mapping.
    pub(crate) fn exec_ranges_of_file_containing(&self, code: u64) -> Vec<(u64, u64)> {
        let Some(file) = self.mappings.iter().find(|m| m.contains(code) && !m.path.is_empty()) else {
            return Vec::new();
        };
        self.mappings.iter().filter(|m| m.exec && m.path == file.path).map(|m| (m.start, m.end)).collect()
    }
}

fn parse_line(line: &str) -> Option<Mapping> {
    // address perms offset dev inode [path]; the path may contain spaces.
    let mut fields = line.splitn(6, ' ');
    let (range, perms) = (fields.next()?, fields.next()?);
    let (start, end) = range.split_once('-')?;
    let path = fields.nth(3).map(str::trim_start).unwrap_or("");
    let perms = perms.as_bytes();
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        read: perms.first() == Some(&b'r'),
        exec: perms.get(2) == Some(&b'x'),
        path: path.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
7f0000000000-7f0000010000 r--p 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libcuda.so.580.1
7f0000010000-7f0000020000 r-xp 00010000 08:01 123 /usr/lib/x86_64-linux-gnu/libcuda.so.580.1
7f0000020000-7f0000030000 rw-p 00020000 08:01 123 /usr/lib/x86_64-linux-gnu/libcuda.so.580.1
7f0000030000-7f0000040000 rw-p 00000000 00:00 0
7f0000050000-7f0000060000 r-xp 00000000 08:01 77 /opt/my lib/other.so
7f0000060000-7f0000070000 ---p 00000000 00:00 0
";

    #[test]
    fn exec_ranges_are_those_of_the_file_holding_the_known_function() {
        let map = MemoryMap::parse(MAPS);
        assert_eq!(map.exec_ranges_of_file_containing(0x7f0000011000), vec![(0x7f0000010000, 0x7f0000020000)]);
        // A data address of the same file names the same file.
        assert_eq!(map.exec_ranges_of_file_containing(0x7f0000020008).len(), 1);
        assert!(map.exec_ranges_of_file_containing(0x7f0000030000).is_empty());
        assert_eq!(map.exec_ranges_of_file_containing(0x7f0000050000), vec![(0x7f0000050000, 0x7f0000060000)]);
    }

    #[test]
    fn readability_spans_adjacent_mappings_and_stops_at_holes() {
        let map = MemoryMap::parse(MAPS);
        assert!(map.readable(0x7f000000fff8, 16));
        assert!(map.readable(0x7f0000030000, 0x10000));
        assert!(!map.readable(0x7f000003fff8, 16));
        assert!(!map.readable(0x7f0000060000, 8));
        assert!(!map.readable(u64::MAX - 3, 8));
    }
}
