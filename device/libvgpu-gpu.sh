#!/usr/bin/env bash
# On the GPU machine: builds the C driver-API programs of guest-agent/libvgpu/tests/c and their
# kernels, runs each natively (real libcuda) and then through libvgpu against a host-proxy with
# the cuda backend, and diffs the two outputs per program.
#
# Carried (build here first): .device-carry/host-proxy and .device-carry/libvgpu/libcuda.so.1.
# Without .device-carry/libvgpu/libcuda.so.1 it stops after the native runs (validates the
# programs). Results: native/, remoted/, diff/, host-proxy.log, summary.txt and
# cuda-error-strings.tsv in /tmp/vgpu-out; when $OUT is set (the device tool brings back at
# most 8 files from it) $OUT gets summary.txt, cuda-error-strings.tsv, all-diffs.txt and
# results.tgz (the whole results folder).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
src=$root/guest-agent/libvgpu/tests/c
carry=$root/.device-carry
out=/tmp/vgpu-out
progs=(device_query contexts memory launch streams_events errors_misc ipc link)
sock=/tmp/vgpu-gpu/host-proxy.sock

work=$(mktemp -d /tmp/vgpu-gpu-work.XXXXXX)
rm -rf "$out"
mkdir -p "$out/native" "$out/remoted" "$out/diff" "$work/bin" "$work/kernels" "$work/lib"

# shellcheck source=device/lib.sh
. device/lib.sh # find_cuda_toolkit, stage_remoting, start_daemon/stop_daemon ($hp), require_libvgpu; run from the repository root
# On any exit: stop the daemon, and bundle the results into $OUT where it is set.
on_exit() {
    stop_daemon
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        for f in summary.txt cuda-error-strings.tsv; do
            if [ -f "$out/$f" ]; then cp "$out/$f" "$OUT/"; fi
        done
        cat "$out"/diff/*.diff >"$OUT/all-diffs.txt" 2>/dev/null || true
        tar czf "$OUT/results.tgz" -C "$(dirname "$out")" "$(basename "$out")" || true
    fi
}
trap on_exit EXIT

echo "== GPU"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || echo "nvidia-smi failed"

# ---- toolkit ----
find_cuda_toolkit

# ---- build ----
echo "== build kernels (sm_90)"
k=$work/kernels
"$nvcc" -ptx -arch=sm_90 "$src/kernels.cu" -o "$k/kernels.ptx"
"$nvcc" -cubin -arch=sm_90 "$src/kernels.cu" -o "$k/kernels.cubin"
"$nvcc" -fatbin -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90 \
    "$src/kernels.cu" -o "$k/kernels.fatbin"
ls -l "$k" | tail -n +2

cc=""
for c in "${CC:-}" gcc cc; do
    if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1; then cc=$c; break; fi
done
echo "== build programs (${cc:-nvcc})"
for p in "${progs[@]}" errstr_dump; do
    if [ -n "$cc" ]; then
        "$cc" -std=c11 -O2 -Wall -Wextra -I"$inc" "$src/$p.c" -o "$work/bin/$p" \
            -L"$stubs" -lcuda -lpthread
    else
        "$nvcc" -x c -Xcompiler -std=c11 -I"$inc" "$src/$p.c" -o "$work/bin/$p" \
            -L"$stubs" -lcuda -lpthread
    fi
done

# Runs one program: run_prog <native|remoted> <prog>; output (with the exit status) in
# $out/<mode>/<prog>.txt, stderr in .err. Extra environment comes from the caller.
run_prog() {
    local mode=$1 p=$2 rc=0
    timeout 120 "$work/bin/$p" "$k" >"$out/$mode/$p.txt" 2>"$out/$mode/$p.err" || rc=$?
    echo "exit status: $rc" >>"$out/$mode/$p.txt"
    return "$rc"
}

# ---- native ----
echo "== native runs"
declare -A native_rc remoted_rc
native_fail=0
for p in "${progs[@]}"; do
    rc=0
    run_prog native "$p" || rc=$?
    native_rc[$p]=$rc
    if [ "$rc" -ne 0 ]; then native_fail=1; fi
    printf '  %-16s exit %s  %s\n' "$p" "$rc" "$(grep -m1 -E '^(OK|FAIL)' "$out/native/$p.txt" || true)"
done
rc=0
timeout 120 "$work/bin/errstr_dump" >"$out/cuda-error-strings.tsv" 2>"$out/native/errstr_dump.err" || rc=$?
echo "  errstr_dump      exit $rc  $(wc -l <"$out/cuda-error-strings.tsv") codes -> cuda-error-strings.tsv"
if [ "$rc" -ne 0 ]; then native_fail=1; fi

if [ ! -f "$carry/libvgpu/libcuda.so.1" ]; then
    echo "== no $carry/libvgpu/libcuda.so.1 carried: native-only validation, stopping here"
    {
        for p in "${progs[@]}"; do printf '%-16s native=%s\n' "$p" "${native_rc[$p]}"; done
    } >"$out/summary.txt"
    cat "$out/summary.txt"
    if [ "$native_fail" -ne 0 ]; then echo "FAIL: a native run failed"; exit 1; fi
    echo "native runs all passed"
    exit 0
fi
if [ ! -f "$carry/host-proxy" ]; then echo "FAIL: $carry/host-proxy not carried" >&2; exit 1; fi

# ---- remoted ----
stage_remoting "$carry" "$work" # sets $lib and $guest_ld (cuda backend unless HOST_PROXY_BACKEND says otherwise)
echo "== starting host-proxy (cuda backend)"
start_daemon "$out/host-proxy.log"
require_libvgpu "$work/bin/device_query" "$lib"

echo "== remoted runs (through libvgpu)"
any_fail=$native_fail
for p in "${progs[@]}"; do
    rc=0
    LD_LIBRARY_PATH=$guest_ld VGPU_SOCKET=$sock VGPU_LOG=warn run_prog remoted "$p" || rc=$?
    remoted_rc[$p]=$rc
done
stop_daemon

{
    printf '%-16s %-7s %-8s %s\n' program native remoted result
    for p in "${progs[@]}"; do
        # The native output with the documented differences applied (expected-differences.tsv).
        awk -F'\t' -v prog="$p" 'FNR == NR { if ($0 !~ /^#/ && $1 == prog) sub_[$2] = $3; next }
            { if ($0 in sub_) { print sub_[$0]; n++ } else print } END { print n + 0 > "/dev/stderr" }' \
            "$src/expected-differences.tsv" "$out/native/$p.txt" >"$out/native/$p.expected" 2>"$out/native/$p.nexp"
        nexp=$(cat "$out/native/$p.nexp")
        if diff -u "$out/native/$p.txt" "$out/remoted/$p.txt" >"$out/diff/$p.diff"; then
            result=PASS
            rm -f "$out/diff/$p.diff"
        elif diff -u "$out/native/$p.expected" "$out/remoted/$p.txt" >/dev/null; then
            result="PASS ($nexp documented difference(s), see expected-differences.tsv)"
        else
            result="FAIL ($(grep -c '^[-+][^-+]' "$out/diff/$p.diff") lines differ, diff/$p.diff)"
            any_fail=1
        fi
        if [ "${native_rc[$p]}" -ne 0 ]; then result="FAIL (native run failed)"; any_fail=1; fi
        printf '%-16s %-7s %-8s %s\n' "$p" "${native_rc[$p]}" "${remoted_rc[$p]}" "$result"
    done
} >"$out/summary.txt"
cat "$out/summary.txt"
for p in "${progs[@]}"; do
    if [ -f "$out/diff/$p.diff" ]; then
        echo "== diff $p (first 40 lines)"
        head -n 40 "$out/diff/$p.diff"
    fi
done
if [ "$any_fail" -ne 0 ]; then echo "libvgpu conformance: FAIL"; exit 1; fi
echo "libvgpu conformance: PASS"
