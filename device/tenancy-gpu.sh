#!/usr/bin/env bash
# On the GPU machine: a zone's quotas across its processes, and its session limit, with the
# cuda backend — the two findings of issue 16, re-run as probes:
#   1. quota: three processes of one zone (one uid) each try to allocate the whole 4 GiB
#      quota at once; together they may hold at most the quota, contexts (528 MiB each, the
#      cuda backend's charge) included;
#   2. flood: one zone opens 48 idle sessions; at most max_sessions (8) attach, the rest are
#      refused with CUDA_ERROR_NOT_PERMITTED; the GPU memory they take is measured
#      (nvidia-smi) and divided by the sessions that attached: the context memory per
#      session that the zone is charged for.
# Needs .device-carry (cargo xtask device-build). Prints one verdict line per probe.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
carry=$PWD/${CARRY:-.device-carry}
# shellcheck source=device/lib.sh
. device/lib.sh
work=$(mktemp -d /tmp/vgpu-tenancy.XXXXXX)
sock=$work/sock/host-proxy.sock
trap 'stop_daemon; pkill -P $$ 2>/dev/null || true' EXIT
find_cuda_toolkit
stage_remoting "$carry" "$work"
gcc -std=c11 -O2 -Wall -I"$inc" device/probes/tenant_alloc.c -o "$work/tenant_alloc" -L"$stubs" -lcuda || exit 1
used_mib() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fails=0

# run_tenants N TARGET CHUNK: starts N tenant processes through libvgpu at once, waits
# (bounded) for each one's line, reads the GPU's memory in use while they hold, then lets
# them go. Lines in $work/tenant.N, the memory in $during.
run_tenants() {
    local n=$1 target=$2 chunk=$3 i
    local -a pids=()
    rm -f "$work/go"
    for i in $(seq 1 "$n"); do
        timeout 150 env LD_LIBRARY_PATH="$lib" VGPU_SOCKET="$sock" VGPU_LOG=error \
            "$work/tenant_alloc" "$target" "$chunk" "$work/go" >"$work/tenant.$i" 2>"$work/tenant.$i.err" &
        pids+=("$!")
    done
    for _ in $(seq 1 1200); do
        local done_n=0
        for i in $(seq 1 "$n"); do [ -s "$work/tenant.$i" ] && done_n=$((done_n + 1)); done
        [ "$done_n" -eq "$n" ] && break
        sleep 0.1
    done
    sleep 1
    during=$(used_mib)
    touch "$work/go"
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}

# -------- 1. quota across processes --------
rm -f "$work"/tenant.*
write_daemon_config "$work/host-proxy.toml" "$sock" "xen = \"off\"" "[quotas]" "mem_bytes = 4294967296" \
    "max_handles = 4096" "max_async_in_flight = 1024" "max_sessions = 8"
start_daemon "$work/host-proxy-quota.log"
base=$(used_mib)
run_tenants 3 4294967296 268435456
stop_daemon
sum=0
for i in 1 2 3; do
    line=$(cat "$work/tenant.$i")
    echo "tenant $i: $line"
    h=$(sed -n 's/.*held=\([0-9]*\).*/\1/p' "$work/tenant.$i")
    sum=$((sum + ${h:-0}))
done
ctx_mib=528
echo "quota: 3 processes of one zone hold $((sum >> 20)) MiB of allocations under a 4096 MiB quota (3 contexts charged ${ctx_mib} MiB each); GPU memory in use: ${base} MiB before, ${during} MiB while they held"
if [ "$sum" -le $(((4096 - 3 * ctx_mib) * 1048576)) ] && [ "$sum" -gt 0 ]; then
    echo "quota across processes: PASS"
else
    echo "quota across processes: FAIL"; fails=$((fails + 1))
fi

# -------- 2. session flood --------
rm -f "$work"/tenant.*
write_daemon_config "$work/host-proxy.toml" "$sock" "xen = \"off\"" "[quotas]" "mem_bytes = 68719476736" \
    "max_handles = 4096" "max_async_in_flight = 1024" "max_sessions = 8"
start_daemon "$work/host-proxy-flood.log"
base=$(used_mib)
run_tenants 48 0 0
stop_daemon
attached=$(cat "$work"/tenant.[0-9]* | grep -c '^attached')
refused=$(cat "$work"/tenant.[0-9]* | grep -c '^refused CUDA_ERROR_NOT_PERMITTED')
other=$((48 - attached - refused))
per=$(( attached > 0 ? (during - base) / attached : 0 ))
echo "flood: 48 sessions of one zone: $attached attached, $refused refused with CUDA_ERROR_NOT_PERMITTED, $other otherwise; GPU memory in use ${base} MiB before, ${during} MiB while they held: about ${per} MiB per attached session"
grep -m 2 'session refused' "$work/host-proxy-flood.log" | sed 's/^/  daemon: /'
if [ "$attached" -eq 8 ] && [ "$refused" -eq 40 ]; then
    echo "session limit: PASS"
else
    echo "session limit: FAIL"; fails=$((fails + 1))
    tail -n 20 "$work/host-proxy-flood.log"
fi
sleep 2
echo "GPU memory in use after every session ended: $(used_mib) MiB"
[ "$fails" -eq 0 ] && echo "tenancy on the GPU: PASS" || { echo "tenancy on the GPU: FAIL ($fails)"; exit 1; }
