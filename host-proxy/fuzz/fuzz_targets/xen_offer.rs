//! Fuzz target: the keys of a guest's xenstore offer. See `host_proxy::fuzz::xen_offer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| host_proxy::fuzz::xen_offer(data));
