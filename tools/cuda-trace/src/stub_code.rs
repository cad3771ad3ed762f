//! Machine code of the runtime stubs (x86_64), built as bytes so it can be tested.
//!
//! A stub page holds, at offset 0, the address of the shared trampoline body and then
//! [`STUBS_PER_PAGE`] stubs of [`STUB_SIZE`] bytes, each:
//!
//! ```text
//! 41 BB id:u32        mov r11d, id          ; the entry id, in a register no argument uses
//! FF 25 rel:i32       jmp [rip + rel]       ; rel reaches back to the address at offset 0
//! CC CC CC CC         int3 padding
//! ```
//!
//! The jump is indirect through the page's own first word because an anonymous mapping may
//! lie farther than ±2 GiB from the library's code.

/// The size of a stub page.
pub(crate) const PAGE_SIZE: usize = 4096;

/// The size of one stub; the first stub-sized block of a page holds the body's address.
pub(crate) const STUB_SIZE: usize = 16;

/// Stubs in one page.
pub(crate) const STUBS_PER_PAGE: usize = PAGE_SIZE / STUB_SIZE - 1;

/// Where stub `k` of a page begins.
pub(crate) const fn stub_offset(k: usize) -> usize {
    STUB_SIZE * (k + 1)
}

/// The contents of a stub page whose stubs carry the ids `first_id..first_id +
/// STUBS_PER_PAGE` and jump to `body`.
pub(crate) fn page_image(first_id: u32, body: u64) -> Vec<u8> {
    let mut page = vec![0xCC; PAGE_SIZE];
    page[..8].copy_from_slice(&body.to_le_bytes());
    for k in 0..STUBS_PER_PAGE {
        let at = stub_offset(k);
        let id = first_id + k as u32;
        // The jump's displacement counts from the end of the jump instruction (12 bytes in).
        let rel = -((at + 12) as i32);
        let stub = &mut page[at..at + STUB_SIZE];
        stub[..2].copy_from_slice(&[0x41, 0xBB]);
        stub[2..6].copy_from_slice(&id.to_le_bytes());
        stub[6..8].copy_from_slice(&[0xFF, 0x25]);
        stub[8..12].copy_from_slice(&rel.to_le_bytes());
    }
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stub_loads_its_id_and_jumps_through_the_page_head() {
        let page = page_image(0x1_0000, 0x1122_3344_5566_7788);
        assert_eq!(page.len(), PAGE_SIZE);
        assert_eq!(&page[..8], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(
            &page[16..32],
            &[0x41, 0xBB, 0x00, 0x00, 0x01, 0x00, 0xFF, 0x25, 0xE4, 0xFF, 0xFF, 0xFF, 0xCC, 0xCC, 0xCC, 0xCC]
        );
        let last = stub_offset(STUBS_PER_PAGE - 1);
        assert_eq!(last + STUB_SIZE, PAGE_SIZE);
        let id = u32::from_le_bytes(page[last + 2..last + 6].try_into().unwrap());
        assert_eq!(id, 0x1_0000 + STUBS_PER_PAGE as u32 - 1);
        let rel = i32::from_le_bytes(page[last + 8..last + 12].try_into().unwrap());
        assert_eq!(last as i64 + 12 + i64::from(rel), 0);
    }
}
