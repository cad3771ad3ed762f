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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fat binary whose entries carry `payloads`, each behind a 64-byte entry header
    /// (the size the CUDA toolkit writes) whose unread bytes are `0xa5`.
    fn fatbin(payloads: &[&[u8]]) -> Vec<u8> {
        let mut entries = Vec::new();
        for p in payloads {
            entries.extend_from_slice(&[0x02, 0x00, 0x01, 0x01, 64, 0, 0, 0]);
            entries.extend_from_slice(&(p.len() as u64).to_le_bytes());
            entries.resize(entries.len() + 48, 0xa5);
            entries.extend_from_slice(p);
        }
        let mut image = FATBIN_MAGIC.to_le_bytes().to_vec();
        image.extend_from_slice(&[0x01, 0x00, 16, 0]);
        image.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        image.extend(entries);
        image
    }

    #[test]
    fn integers_are_read_only_when_the_bytes_hold_them() {
        let bytes = [0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08];
        assert_eq!(read_u16(&bytes, 6), Some(0x0807));
        assert_eq!(read_u32(&bytes, 4), Some(0x0807_0605));
        assert_eq!(read_u64(&bytes, 0), Some(0x0807_0605_0403_0201));
        assert_eq!(read_u16(&bytes, 7), None);
        assert_eq!(read_u32(&bytes, 5), None);
        assert_eq!(read_u64(&bytes, 1), None);
        for at in [u64::MAX, u64::MAX - 1, 1 << 63] {
            assert_eq!((read_u16(&bytes, at), read_u32(&bytes, at), read_u64(&bytes, at)), (None, None, None));
        }
        assert!(in_bounds(&bytes, 0, 8) && in_bounds(&bytes, 8, 0));
        assert!(!in_bounds(&bytes, 1, 8) && !in_bounds(&bytes, 9, 0) && !in_bounds(&bytes, 1, u64::MAX));
    }

    #[test]
    fn a_fatbin_yields_its_payloads_in_order() {
        let image = fatbin(&[b"\x7fELF cubin", b"", b"ptx text"]);
        let want: [&[u8]; 3] = [b"\x7fELF cubin", b"", b"ptx text"];
        assert_eq!(fatbin_payloads(&image), Some(want.to_vec()));
        assert_eq!(fatbin_payloads(&fatbin(&[])), Some(vec![]));
        // Bytes after the container are not its business.
        let mut padded = image.clone();
        padded.extend_from_slice(&[0; 64]);
        assert_eq!(fatbin_payloads(&padded), Some(want.to_vec()));
    }

    #[test]
    fn a_fatbin_that_lies_about_its_sizes_yields_nothing() {
        let good = fatbin(&[b"payload"]);
        let with = |at: usize, bytes: &[u8]| {
            let mut image = good.clone();
            image[at..at + bytes.len()].copy_from_slice(bytes);
            image
        };
        for image in [
            with(6, &15u16.to_le_bytes()),                        // header shorter than itself
            with(8, &(good.len() as u64).to_le_bytes()),          // entries past the end
            with(8, &u64::MAX.to_le_bytes()),                     // entries' end overflows
            with(16 + 4, &15u32.to_le_bytes()),                   // entry header too short
            with(16 + 4, &u32::MAX.to_le_bytes()),                // entry header past the end
            with(16 + 8, &8u64.to_le_bytes()),                    // payload past the end
            with(16 + 8, &u64::MAX.to_le_bytes()),                // payload's end overflows
            with(8, &(good.len() as u64 - 16 - 1).to_le_bytes()), // entries cut short
        ] {
            assert_eq!(fatbin_payloads(&image), None, "{image:02x?}");
        }
        assert_eq!(fatbin_payloads(&[]), None);
    }

    /// Every prefix and every one-byte corruption of a valid image parses without panic, and
    /// whatever payloads come out lie inside the image.
    #[test]
    fn truncated_and_corrupted_fatbins_never_read_outside_the_image() {
        let good = fatbin(&[b"first", b"second payload"]);
        let mut images: Vec<Vec<u8>> = (0..good.len()).map(|n| good[..n].to_vec()).collect();
        for at in 0..good.len() {
            for byte in [0x00, 0x10, 0xff] {
                let mut image = good.clone();
                image[at] = byte;
                images.push(image);
            }
        }
        for image in &images {
            for p in fatbin_payloads(image).unwrap_or_default() {
                let range = image.as_ptr_range();
                assert!(range.start <= p.as_ptr() && p.as_ptr_range().end <= range.end);
            }
        }
    }
}
