//! The guest agent (PID 1 of a xen-vgpu zone) — not built yet.
//!
//! It will mount proc/sys/devtmpfs, bring up the channel to host-proxy, start the
//! workload, report its exit status through xenstore and power the domain off (the
//! build-image issue). Until then this binary only says so and fails.
#![forbid(unsafe_code)]

fn main() {
    eprintln!("guest-agent: not implemented yet (see the build-image and libvgpu issues)");
    std::process::exit(2);
}
