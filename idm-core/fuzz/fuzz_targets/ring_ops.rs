//! Fuzz target: arbitrary bytes as a sequence of ring operations, sends, receives and
//! corruptions of the shared memory. See `idm_core_fuzz::ring_ops`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| idm_core_fuzz::ring_ops(data));
