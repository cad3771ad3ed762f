#!/usr/bin/env bash
# On the GPU machine: the multi-tenant benchmark of issue 16 (a benchmark, not a test).
# N = 1, 2, 4, 8 tenants at once, natively as N processes and through libvgpu + host-proxy
# (cuda backend) as N zones — each its own uid, so its own zone with its own quotas
# (sharing mode: isolated, the only one served today) — under two loads:
#   launch — empty kernel + cuCtxSynchronize per iteration;  copy — 4 MiB pinned HtoD.
# Then fairness: one tenant with ~5 ms kernels beside one with the launch load, natively and
# as two zones. Then the same N runs with the zones as clients of one MPS server
# (sharing = "mps", one sharing group, started by host-proxy), and the containment probe in
# each mode: zone A faults (a kernel writes to address 0) beside a steady zone B of the same
# mode and group and a steady isolated zone C. Each run lasts $TENANTS_SECONDS (default 3)
# after every tenant is ready.
# Prints, per run: aggregate rate, each tenant's p50/p99, and the ratio zones / native.
# Needs .device-carry (cargo xtask device-build); run as root (tenants get uids 61001…).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
carry=$PWD/${CARRY:-.device-carry}
# shellcheck source=device/lib.sh
. device/lib.sh
work=$(mktemp -d /tmp/vgpu-tenants.XXXXXX)
chmod 755 "$work"
sock=$work/sock/host-proxy.sock
secs=${TENANTS_SECONDS:-3}
trap 'stop_daemon; pkill -P $$ 2>/dev/null || true' EXIT
find_cuda_toolkit
stage_remoting "$carry" "$work"
gcc -std=c11 -O2 -Wall -I"$inc" device/probes/tenant_load.c -o "$work/tenant_load" -L"$stubs" -lcuda || exit 1
chmod -R a+rX "$work"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "== $(date -u +%FT%TZ), ${secs} s per run, $(nproc) cores"
# daemon MODE: (re)starts host-proxy; uids 61001-61008 are zones "t1".."t8" (sharing MODE,
# one group "bench" when MODE is mps), 61009 is zone "iso" (isolated).
daemon() {
    stop_daemon
    local zones=() i
    for i in $(seq 1 8); do
        zones+=("[[zone]]" "name = \"t$i\"" "uid = $((61000 + i))" "sharing = \"$1\"")
    done
    zones+=("[[zone]]" "name = \"iso\"" "uid = 61009")
    [ "$1" = mps ] && zones+=("[[sharing_group]]" "name = \"bench\"" 'zones = ["t1", "t2", "t3", "t4", "t5", "t6", "t7", "t8"]')
    write_daemon_config "$work/host-proxy.toml" "$sock" 'xen = "off"' "mps_dir = \"$work/mps\"" "${zones[@]}"
    HOST_PROXY_LOG=warn start_daemon "$work/host-proxy-$1.log"
    chmod 755 "$(dirname "$sock")"
    chmod 666 "$sock"
}

# run WHERE LOAD[@UID]... : one tenant per LOAD at once (WHERE: native | zones), the i-th
# as uid 61000+i unless given; lines in $work/out.*
run() {
    local where=$1 i=0 m
    shift
    rm -f "$work"/out.* "$work/go"
    local -a pids=()
    for m in "$@"; do
        i=$((i + 1))
        local uid=$((61000 + i))
        case "$m" in *@*) uid=${m#*@}; m=${m%@*} ;; esac
        if [ "$where" = native ]; then
            timeout 120 setpriv --reuid=$uid --regid=$uid --clear-groups \
                "$work/tenant_load" "$m" "$secs" "$work/go" >"$work/out.$i" 2>&1 &
        else
            timeout 120 setpriv --reuid=$uid --regid=$uid --clear-groups env LD_LIBRARY_PATH="$lib" \
                VGPU_SOCKET="$sock" VGPU_LOG=error "$work/tenant_load" "$m" "$secs" "$work/go" >"$work/out.$i" 2>&1 &
        fi
        pids+=("$!")
    done
    for _ in $(seq 1 600); do
        [ "$(cat "$work"/out.* 2>/dev/null | grep -cE '^(ready|mode=error)')" -eq "$#" ] && break
        sleep 0.1
    done
    touch "$work/go"
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}

# summary: "aggregate <rate> | tenants: p50/p99 …" from $work/out.*
summary() {
    awk '/^mode=error/ {print "ERROR " $0; exit}
         /^mode=fault/ { line = line " " $0; next }
         /^mode=/ { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                    agg += v["rate"]; gb += v["gbps"]; line = line sprintf(" %s:%.0f/s p50=%.1f p99=%.1f", v["mode"], v["rate"], v["p50_us"], v["p99_us"]) }
         END { if (agg) printf "aggregate %.0f/s%s |%s\n", agg, (gb ? sprintf(" (%.1f GB/s)", gb) : ""), line }' "$work"/out.*
}

daemon isolated
declare -A agg
for mode in launch copy; do
    for n in 1 2 4 8; do
        modes=()
        for _ in $(seq 1 "$n"); do modes+=("$mode"); done
        for where in native zones; do
            run "$where" "${modes[@]}"
            s=$(summary)
            agg[$where]=$(echo "$s" | awk '{print $2}' | tr -d '/s')
            echo "$mode N=$n $where: $s"
        done
        awk -v z="${agg[zones]:-0}" -v nt="${agg[native]:-0}" -v m="$mode" -v n="$n" \
            'BEGIN { if (nt > 0) printf "%s N=%d: zones / native aggregate = %.2f\n", m, n, z / nt }'
    done
done
echo "== fairness: one tenant with ~5 ms kernels beside one with the launch load"
for where in native zones; do
    run "$where" long launch
    echo "fairness $where: $(summary)"
done
echo "== containment, isolated: zone t1 faults beside zone t2 and zone iso"
run zones fault@61001 launch@61002 launch@61009
cat "$work"/out.1 "$work"/out.2 "$work"/out.3 | grep '^mode=' | sed 's/^/  /'

if ! command -v "${MPS_CONTROL:-nvidia-cuda-mps-control}" >/dev/null; then
    echo "== no nvidia-cuda-mps-control here: the MPS runs are skipped"
    exit 0
fi
daemon mps
for n in 1 2 4 8; do
    modes=()
    for _ in $(seq 1 "$n"); do modes+=(launch); done
    run zones "${modes[@]}"
    echo "launch N=$n zones mps: $(summary)"
done
echo "== containment, mps: zone t1 faults beside zone t2 (same MPS group) and zone iso (isolated)"
run zones fault@61001 launch@61002 launch@61009
cat "$work"/out.1 "$work"/out.2 "$work"/out.3 | grep '^mode=' | sed 's/^/  /'
sleep 1
echo "after the fault, a new session of the group:"
run zones launch@61002
echo "  $(summary)"
stop_daemon
grep -hE 'WARN|ERROR' "$work"/host-proxy-*.log | grep -v 'session refused' | head -n 12 | sed 's/^/  daemon: /'
