//! Gives the shared library the SONAME of NVIDIA's driver library, so that programs linked
//! against it record `libcuda.so.1`, as they do with the real one.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
}
