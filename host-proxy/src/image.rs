//! Module images as a guest sends them: the byte layouts that both the cuda backend's
//! bounds checks (`backend::cuda`) and the zone's "may this module print?" test read.

/// The first bytes of an ELF file (a cubin).
pub const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
/// The magic of a fat binary's header (`fatBinaryHeader`).
pub const FATBIN_MAGIC: u32 = 0xBA55_ED50;

/// A little-endian `u16` at `at`, if `bytes` holds it.
pub fn read_u16(bytes: &[u8], at: u64) -> Option<u16> {
    let at = usize::try_from(at).ok()?;
    Some(u16::from_le_bytes(bytes.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

/// A little-endian `u32` at `at`, if `bytes` holds it.
pub fn read_u32(bytes: &[u8], at: u64) -> Option<u32> {
    let at = usize::try_from(at).ok()?;
    Some(u32::from_le_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

/// A little-endian `u64` at `at`, if `bytes` holds it.
pub fn read_u64(bytes: &[u8], at: u64) -> Option<u64> {
    let at = usize::try_from(at).ok()?;
    Some(u64::from_le_bytes(bytes.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// Whether `[offset, offset + len)` lies inside `bytes`.
pub fn in_bounds(bytes: &[u8], offset: u64, len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= bytes.len() as u64)
}

/// The payloads of a fat binary's entries, in order; `None` when its container or an
/// entry does not lie inside `image`. Layout: a 16-byte header (magic, version, header
/// size `u16` at 6, size of the entries `u64` at 8), then entries, each a header of at
/// least 16 bytes (its size `u32` at 4, its payload's size `u64` at 8) and its payload.
pub fn fatbin_payloads(image: &[u8]) -> Option<Vec<&[u8]>> {
    let start = u64::from(read_u16(image, 6)?);
    let end = start.checked_add(read_u64(image, 8)?)?;
    if start < 16 || !in_bounds(image, 0, end) {
        return None;
    }
    let mut bodies = Vec::new();
    let mut at = start;
    while at < end {
        let (entry_header, payload) = (read_u32(image, at + 4)?, read_u64(image, at + 8)?);
        let data = at + u64::from(entry_header);
        let next = data.checked_add(payload)?;
        if entry_header < 16 || next > end {
            return None;
        }
        // `next <= end <= image.len()`, so both convert and the range is in bounds.
        bodies.push(&image[usize::try_from(data).ok()?..usize::try_from(next).ok()?]);
        at = next;
    }
    Some(bodies)
}
