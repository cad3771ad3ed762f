#!/usr/bin/env bash
# On the GPU machine: runs host-proxy's zone integration test and the cudarc backend's tests
# against the real GPU. Build here first (`cargo xtask device-build`), carry .device-carry.
set -euo pipefail
cd "$(dirname "$0")/.."
c=.device-carry
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== cuda backend unit tests (real GPU)"
VGPU_TEST_CUDA=1 "$c/host_proxy_lib_tests" backend::cuda --test-threads=1
echo "== zone integration test, cuda backend (real GPU)"
VGPU_TEST_BACKEND=cuda VGPU_HOST_PROXY_BIN="$PWD/$c/host-proxy" VGPU_LOG=info "$c/zones_test" --test-threads=1
