//! Gives the tracer the SONAME of NVIDIA's driver library, so that it can stand in for
//! `libcuda.so.1` the way libvgpu does (same approach as guest-agent/libvgpu/build.rs).
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
}
