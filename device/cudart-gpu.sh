#!/usr/bin/env bash
# On the GPU machine: CUDA runtime (libcudart) programs natively and through libvgpu +
# host-proxy (cuda backend), outputs compared. Builds guest-agent/libvgpu/tests/cudart/:
# cudart_basic.c with the C compiler against the toolkit's libcudart (shared and static)
# and cudart_kernels.cu with nvcc (its default static runtime, and -cudart shared), and
# cudart_ptds.cu with nvcc --default-stream per-thread (per-thread default streams). Needs
# `cargo xtask device-build`'s .device-carry (CARRY selects another). Prints one verdict
# per program and exits 1 if any differs.
set -uo pipefail
cd "$(dirname "$0")/.."
carry=$PWD/${CARRY:-.device-carry}
# shellcheck source=device/lib.sh
. device/lib.sh # find_cuda_toolkit, stage_remoting, start_daemon/stop_daemon, require_libvgpu
work=$(mktemp -d /tmp/vgpu-cudart.XXXXXX)
sock=$work/sock/host-proxy.sock
trap stop_daemon EXIT
find_cuda_toolkit
src=guest-agent/libvgpu/tests/cudart
libdir=""
for d in "$cuda_home/lib64" "$cuda_home/targets/x86_64-linux/lib"; do
    if [ -f "$d/libcudart_static.a" ]; then libdir=$d; break; fi
done
[ -n "$libdir" ] || { echo "FAIL: libcudart_static.a not found under $cuda_home" >&2; exit 1; }
cc=${CC:-gcc}
command -v "$cc" >/dev/null 2>&1 || cc=cc
mkdir -p "$work/bin"
timeout 120 "$cc" -std=c11 -O1 -I"$inc" "$src/cudart_basic.c" -o "$work/bin/basic-shared" \
    -L"$libdir" -lcudart -Wl,-rpath,"$libdir" || exit 1
timeout 120 "$cc" -std=c11 -O1 -I"$inc" "$src/cudart_basic.c" -o "$work/bin/basic-static" \
    "$libdir/libcudart_static.a" -ldl -lpthread -lrt || exit 1
timeout 300 "$nvcc" -arch=sm_90 -o "$work/bin/kernels-static" "$src/cudart_kernels.cu" || exit 1
timeout 300 "$nvcc" -arch=sm_90 -cudart shared -o "$work/bin/kernels-shared" "$src/cudart_kernels.cu" || exit 1
timeout 300 "$nvcc" -arch=sm_90 --default-stream per-thread -o "$work/bin/ptds" "$src/cudart_ptds.cu" || exit 1
echo "== built $(ls "$work/bin" | tr '\n' ' ')"
stage_remoting "$carry" "$work"
start_daemon "$work/host-proxy.log"
fails=0
for p in basic-shared basic-static kernels-static kernels-shared ptds; do
    timeout 60 "$work/bin/$p" >"$work/$p.native" 2>&1
    ns=$?
    # libcudart dlopens libcuda.so.1 (ldd cannot show it): libvgpu's "attached" line at
    # VGPU_LOG=info proves the program went through it.
    LD_LIBRARY_PATH=$guest_ld VGPU_SOCKET=$sock VGPU_LOG=${VGPU_LOG:-info} timeout 60 "$work/bin/$p" \
        >"$work/$p.libvgpu.out" 2>"$work/$p.libvgpu.err"
    vs=$?
    if ! grep -q "libvgpu: attached as zone" "$work/$p.libvgpu.err"; then
        fails=$((fails + 1))
        echo "FAIL $p: did not load libvgpu as libcuda.so.1"
    elif [ "$ns" = 0 ] && [ "$vs" = 0 ] && diff -q "$work/$p.native" "$work/$p.libvgpu.out" >/dev/null; then
        echo "PASS $p (native and libvgpu identical, $(grep -c '^ok:' "$work/$p.native") checks)"
    else
        fails=$((fails + 1))
        echo "FAIL $p: native exit $ns, libvgpu exit $vs"
        diff "$work/$p.native" "$work/$p.libvgpu.out" | head -20
        echo "-- libvgpu stderr:"
        tail -n 20 "$work/$p.libvgpu.err"
    fi
    if [ -s "$work/$p.libvgpu.err" ]; then
        echo "-- $p libvgpu log:"
        sort "$work/$p.libvgpu.err" | uniq -c | sort -rn | head -10
    fi
done
echo "== host-proxy log (warnings and errors)"
grep -E "WARN|ERROR" "$work/host-proxy.log" | tail -n 20
echo "== cudart-gpu: $fails of 5 programs differ"
[ "$fails" = 0 ]
