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

# build_bench <bench source dir> <work dir>: builds bench_kernels.fatbin (nvcc; sm_90 and
# compute_90 PTX) into <work>/kernels and the bench program (gcc, else nvcc's host
# compiler) into <work>/bin/bench against the toolkit's stub libcuda. Sets bin and k.
# Needs find_cuda_toolkit first.
build_bench() {
    local src=$1 work=$2 cc=""
    k=$work/kernels
    bin=$work/bin/bench
    mkdir -p "$k" "$work/bin"
    "$nvcc" -fatbin -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90 \
        "$src/bench_kernels.cu" -o "$k/bench_kernels.fatbin"
    for c in "${CC:-}" gcc cc; do
        if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1; then cc=$c; break; fi
    done
    if [ -n "$cc" ]; then
        "$cc" -std=c11 -O2 -Wall -Wextra -I"$inc" "$src/bench.c" -o "$bin" -L"$stubs" -lcuda
    else
        "$nvcc" -x c -O2 -Xcompiler -std=c11 -I"$inc" "$src/bench.c" -o "$bin" -L"$stubs" -lcuda
    fi
    echo "== built bench (${cc:-nvcc}) and bench_kernels.fatbin"
}

# write_daemon_config <file> <socket> [EXTRA TOML LINE...]: host-proxy's config for the
# on-device runs (cuda backend unless HOST_PROXY_BACKEND says otherwise, device 0).
write_daemon_config() {
    local file=$1 socket=$2
    shift 2
    printf 'socket = "%s"\nbackend = "%s"\ndevice = 0\n' "$socket" "${HOST_PROXY_BACKEND:-cuda}" >"$file"
    if [ "$#" -gt 0 ]; then printf '%s\n' "$@" >>"$file"; fi
}

# start_daemon <log> [WRAPPER...]: starts $work/host-proxy serve with $work/host-proxy.toml
# (under WRAPPER, e.g. perf or taskset, when given), sets hp, and waits for $sock. The
# daemon gets the inherited environment (never libvgpu's directory): it must load the real
# libcuda.
start_daemon() {
    local log=$1
    shift
    rm -rf "$(dirname "$sock")"
    mkdir -p "$(dirname "$sock")"
    NO_COLOR=1 VGPU_LOG="${HOST_PROXY_LOG:-info}" "$@" "$work/host-proxy" serve \
        --config "$work/host-proxy.toml" >"$log" 2>&1 &
    hp=$!
    for _ in $(seq 1 300); do
        [ -S "$sock" ] && return 0
        if ! kill -0 "$hp" 2>/dev/null; then
            echo "FAIL: host-proxy exited before listening" >&2
            tail -n 50 "$log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "FAIL: no socket $sock after 30 s" >&2
    exit 1
}

# stage_remoting <carry dir> <work dir>: copies the carried libvgpu into <work>/lib (with a
# libcuda.so link) and host-proxy into <work>, writes <work>/host-proxy.toml for $sock. Sets
# lib and guest_ld (the LD_LIBRARY_PATH that makes programs load libvgpu).
stage_remoting() {
    local carry=$1 work=$2
    lib=$work/lib
    mkdir -p "$lib"
    cp -a "$carry/libvgpu/." "$lib/"
    chmod -R u+w "$lib"
    [ -e "$lib/libcuda.so" ] || ln -s libcuda.so.1 "$lib/libcuda.so"
    cp "$carry/host-proxy" "$work/host-proxy"
    chmod u+x "$work/host-proxy"
    write_daemon_config "$work/host-proxy.toml" "$sock"
    guest_ld=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
}
