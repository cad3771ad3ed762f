//! Helpers shared by idm-core's integration tests: heap memory standing in for a shared
//! page, and test configuration that adapts to Miri.
#![allow(unsafe_code, dead_code)]

use idm_core::region::RawRegion;
use std::ptr::NonNull;

/// Zeroed, 8-byte aligned heap memory and a region over it.
///
/// The region is declared before the buffer so it is dropped first; nothing else touches
/// the buffer while the region lives.
pub struct HeapRegion {
    pub region: RawRegion,
    _buf: Vec<u64>,
}

impl HeapRegion {
    pub fn new(bytes: usize) -> Self {
        let mut buf = vec![0u64; bytes.div_ceil(8)];
        let ptr = NonNull::new(buf.as_mut_ptr().cast::<u8>()).expect("Vec pointer is non-null");
        // SAFETY: a Vec<u64> buffer is 8-byte aligned and at least `bytes` long; it lives in
        // `_buf` next to the region and is only ever accessed through the region (the field
        // is private and never read), and moving the Vec does not move its heap buffer.
        let region = unsafe { RawRegion::new(ptr, bytes) };
        HeapRegion { region, _buf: buf }
    }
}

/// Proptest configuration: `cases` normally, a handful under Miri (which is ~1000x slower),
/// and no failure-persistence files (Miri's isolation forbids file access).
pub fn proptest_config(cases: u32) -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        cases: if cfg!(miri) { 4 } else { cases },
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}
