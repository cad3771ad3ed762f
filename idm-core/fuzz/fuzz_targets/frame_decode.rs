//! Fuzz target: arbitrary bytes as a frame from a hostile peer (header parse, every
//! protocol body, dispatch by id, stream framing). See `idm_core_fuzz::frame_decode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| idm_core_fuzz::frame_decode(data));
