//! Fuzz target: frames from workers on the IPC broker's channel, applied to its registry. See `host_proxy::fuzz::broker_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| host_proxy::fuzz::broker_frames(data));
