//! Fuzz target: module images (fat binary walk, loads as module and library). See `host_proxy::fuzz::module_image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| host_proxy::fuzz::module_image(data));
