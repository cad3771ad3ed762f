//! host-proxy, the driver-domain daemon — not built yet.
//!
//! It will accept zones over the local and Xen transports, run each zone's GPU work in its
//! own worker process and CUDA context, and enforce handles, quotas and IPC policy (the
//! host-proxy issue). Until then this binary only says so and fails.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("host-proxy: not implemented yet (see the host-proxy issue)");
    std::process::exit(2);
}
