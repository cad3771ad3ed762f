#!/usr/bin/env bash
# On the GPU machine: does a CUDA runtime (libcudart) program run through libvgpu? Builds
# guest-agent/libvgpu/bench/cudart_probe.cu with nvcc (libcudart shared), runs it natively,
# then through libvgpu + host-proxy (carried: `cargo xtask device-build`). Today it stops at
# its first runtime call: libcudart asks cuGetExportTable for a private table, which libvgpu
# refuses (the PyTorch step of DESIGN.md waits on this).
set -uo pipefail
cd "$(dirname "$0")/.."
carry=$PWD/${CARRY:-.device-carry}
# shellcheck source=device/lib.sh
. device/lib.sh # find_cuda_toolkit, stage_remoting, start_daemon/stop_daemon
work=$(mktemp -d /tmp/vgpu-cudart-probe.XXXXXX)
sock=$work/sock/host-proxy.sock
trap stop_daemon EXIT
find_cuda_toolkit
"$nvcc" -o "$work/cudart_probe" guest-agent/libvgpu/bench/cudart_probe.cu -cudart shared || exit 1
stage_remoting "$carry" "$work"
echo "== native"
"$work/cudart_probe"
echo "exit status $?"
start_daemon "$work/host-proxy.log"
echo "== through libvgpu"
LD_LIBRARY_PATH=$guest_ld VGPU_SOCKET=$sock VGPU_LOG=info timeout 60 "$work/cudart_probe"
echo "exit status $?"
