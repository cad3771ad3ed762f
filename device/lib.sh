# shellcheck shell=bash
# Shared by the on-device scripts (sourced, not run).

# Finds the CUDA toolkit: sets nvcc, cuda_home, inc (cuda.h) and stubs (stub libcuda.so to
# link against); exits with a clear message when any is missing.
find_cuda_toolkit() {
    nvcc=""
    if command -v nvcc >/dev/null 2>&1; then
        nvcc=$(command -v nvcc)
    else
        for c in /usr/local/cuda/bin/nvcc /usr/local/cuda-13*/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
            if [ -x "$c" ]; then nvcc=$c; break; fi
        done
    fi
    if [ -z "$nvcc" ]; then echo "FAIL: nvcc not found" >&2; exit 1; fi
    cuda_home=$(cd "$(dirname "$nvcc")/.." && pwd)
    echo "== nvcc: $nvcc ($("$nvcc" --version | tail -n 1))"
    inc=""
    for d in "$cuda_home/include" "$cuda_home/targets/x86_64-linux/include"; do
        if [ -f "$d/cuda.h" ]; then inc=$d; break; fi
    done
    stubs=""
    for d in "$cuda_home/lib64/stubs" "$cuda_home/targets/x86_64-linux/lib/stubs"; do
        if [ -f "$d/libcuda.so" ]; then stubs=$d; break; fi
    done
    if [ -z "$inc" ] || [ -z "$stubs" ]; then
        echo "FAIL: cuda.h ($inc) or stubs/libcuda.so ($stubs) not found under $cuda_home" >&2
        exit 1
    fi
}

# Stops the host-proxy daemon whose pid is in $hp, if it runs.
hp=""
stop_daemon() {
    if [ -n "$hp" ] && kill -0 "$hp" 2>/dev/null; then
        kill "$hp" 2>/dev/null || true
        wait "$hp" 2>/dev/null || true
    fi
    hp=""
}

# require_libvgpu <binary> <libdir>: with <libdir> first on LD_LIBRARY_PATH, <binary>'s
# libcuda.so.1 must resolve into <libdir> (libvgpu), not to a driver's libcuda; exits if not.
require_libvgpu() {
    local resolved
    resolved=$(LD_LIBRARY_PATH=$2${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ldd "$1" | awk '/libcuda\.so\.1/ {print $3}')
    echo "== libcuda.so.1 of $(basename "$1") resolves to: $resolved"
    case "$resolved" in
    "$2"/*) ;;
    *) echo "FAIL: libcuda.so.1 does not resolve to libvgpu ($2)" >&2; exit 1 ;;
    esac
}
