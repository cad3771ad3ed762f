//! Fuzz target: sequences of requests into three zones on the simulated GPU, their accounting checked after each. See `host_proxy::fuzz::zone_requests`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| host_proxy::fuzz::zone_requests(data));
