#!/usr/bin/env bash
# On the GPU machine: runs programs with cuda-trace (tools/cuda-trace) as libcuda.so.1 in front
# of the real driver and summarises each trace: the export tables requested (by UUID) and, per
# UUID, which slots were called how often; the driver functions called, with counts.
#
# Usage: device/cuda-trace.sh 'COMMAND LINE' ['COMMAND LINE'...]  (each is run by bash -c)
# Carried: .device-carry/cuda-trace/libcuda.so (CARRY selects another carry folder).
# Traces go to TRACE_DIR (default $OUT/traces when $OUT is set, else a new folder in /tmp):
# trace-<n>-<pid>.tsv for each process of command n, and summary.txt. Under $OUT (at most 8
# files come back) the traces are packed into traces.tgz instead. TRACE_TIMEOUT (seconds,
# default 300) bounds each command; VGPU_TRACE_REAL names the driver when the default search
# (ldconfig, then the usual paths) finds the wrong one; VGPU_TRACE_QUIET_NAMES passes through.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
carry=$PWD/${CARRY:-.device-carry}
tracer=$carry/cuda-trace/libcuda.so
if [ "$#" -eq 0 ]; then echo "usage: $0 'COMMAND LINE' ['COMMAND LINE'...]" >&2; exit 2; fi
if [ ! -f "$tracer" ]; then echo "FAIL: $tracer not found (cargo xtask device-build)" >&2; exit 1; fi

# ---- the real driver ----
real=${VGPU_TRACE_REAL:-}
if [ -z "$real" ]; then
    for c in $(timeout 10 ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 / {print $NF}') \
        /usr/lib/x86_64-linux-gnu/libcuda.so.1 /usr/lib64/libcuda.so.1 /usr/local/nvidia/lib64/libcuda.so.1; do
        if [ -e "$c" ]; then real=$c; break; fi
    done
fi
if [ -z "$real" ] || [ ! -e "$real" ]; then echo "FAIL: no real libcuda.so.1 found; set VGPU_TRACE_REAL" >&2; exit 1; fi
echo "== real driver: $real -> $(readlink -f "$real")"
timeout 30 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || echo "nvidia-smi failed"

# ---- stage the tracer under the driver's names ----
work=$(mktemp -d /tmp/vgpu-cuda-trace.XXXXXX)
lib=$work/lib
mkdir -p "$lib"
cp "$tracer" "$lib/libcuda.so.1"
ln -s libcuda.so.1 "$lib/libcuda.so"
if [ -n "${TRACE_DIR:-}" ]; then
    trace_dir=$TRACE_DIR
elif [ -n "${OUT:-}" ]; then
    trace_dir=$OUT/traces
else
    trace_dir=$work/traces
fi
mkdir -p "$trace_dir"
echo "== traces in $trace_dir"

# ---- run ----
n=0
for cmd in "$@"; do
    n=$((n + 1))
    echo "== [$n] $cmd"
    LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} VGPU_TRACE_REAL=$real \
        VGPU_TRACE_OUT="$trace_dir/trace-$n-%p.tsv" timeout "${TRACE_TIMEOUT:-300}" bash -c "$cmd"
    echo "exit status $?"
    if ! ls "$trace_dir"/trace-"$n"-*.tsv >/dev/null 2>&1; then
        echo "WARN: [$n] left no trace: it never loaded libcuda.so.1 from $lib (no CUDA, an RPATH, or a full path)"
    fi
done

# ---- summaries ----
# summarize <trace>: prints the tables, slot calls, driver calls and failures of one trace.
summarize() {
    local t=$1
    echo "== $(basename "$t"): $(awk -F'\t' '$3 == "info" && $4 == "start" {print $7; exit}' "$t")," \
        "$(grep -c $'\tcall\t' "$t") calls"
    echo "-- export tables requested (requests, UUID, answer) and their slots called (count, slot):"
    # Tables: "UUID 0 0 answer"; slot calls: "UUID 1 slot count"; sorted per UUID, by slot.
    {
        awk -F'\t' '$3 == "table" {s = $5; for (i = 8; i <= NF; i++) s = s " " $i; print $4 "\t" s}' "$t" |
            sort | uniq -c | awk '{c = $1; sub(/^ *[0-9]+ /, ""); split($0, f, "\t"); print f[1] "\t0\t0\t" c "x " f[2]}'
        awk -F'\t' '$3 == "call" && $5 == "via=slot" {print $4}' "$t" | sort | uniq -c |
            awk '{split($2, p, "["); sub(/]$/, "", p[2]); print p[1] "\t1\t" p[2] "\t" $1}'
    } | sort -t$'\t' -k1,1 -k2,2n -k3,3n |
        awk -F'\t' '$2 == 0 {printf "  %s  %s\n", $1, $4} $2 == 1 {printf "      [%s] %s\n", $3, $4}'
    echo "-- driver functions called (count, name):"
    awk -F'\t' '$3 == "call" && $5 != "via=slot" {print $4}' "$t" | sort | uniq -c | sort -rn | sed 's/^/  /'
    echo "-- nonzero results (count, name, CUresult):"
    awk -F'\t' '$3 == "ret" && $8 ~ /^result=/ && $8 != "result=0" {print $4 " " substr($8, 8)}' "$t" |
        sort | uniq -c | sort -rn | head -n 40 | sed 's/^/  /'
    echo "-- cuGetProcAddress symbols not found (name, version, flags):"
    awk -F'\t' '$3 == "proc" && $7 != "rc=0" {print $4 " " $5 " " $6}' "$t" | sort -u | head -n 40 | sed 's/^/  /'
    if grep -q $'\terror\t' "$t"; then
        echo "-- tracer errors:"
        grep $'\terror\t' "$t" | cut -f4- | sort | uniq -c | head -n 20
    fi
}

for t in "$trace_dir"/trace-*.tsv; do
    [ -e "$t" ] || continue
    summarize "$t"
done | tee "$trace_dir/summary.txt"

if [ -n "${OUT:-}" ] && [ "${trace_dir#"$OUT"}" != "$trace_dir" ]; then
    # The device tool brings back at most 8 files: pack the traces beside the summary.
    if ls "$trace_dir"/trace-*.tsv >/dev/null 2>&1; then
        (cd "$trace_dir" && tar czf traces.tgz trace-*.tsv && rm -f trace-*.tsv)
        echo "== traces packed into $trace_dir/traces.tgz"
    fi
fi
