//! Fuzz target: the byte stream from xenstored. See `host_proxy::fuzz::xenstore_replies`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| host_proxy::fuzz::xenstore_replies(data));
