//! `containerd-shim-xenvgpu-v2`: started by containerd for runtime `io.containerd.xenvgpu.v2`.
//! See the library's documentation.

fn main() {
    containerd_shim::run::<containerd_shim_xenvgpu::service::Service>("io.containerd.xenvgpu.v2", None);
}
