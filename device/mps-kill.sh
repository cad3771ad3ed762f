#!/usr/bin/env bash
# On the GPU machine: does the real MPS server of a `sharing = "mps"` group go when its
# host-proxy is killed (SIGKILL: no shutdown path runs)? host-proxy arms PR_SET_PDEATHSIG
# (SIGTERM) on each nvidia-cuda-mps-control it starts; this checks what the real control
# daemon then does with its server. A zone (uid 61001, group "g") runs the launch load
# through libvgpu; the daemon is killed; the script waits up to 15 s for every
# nvidia-cuda-mps-control and nvidia-cuda-mps-server to exit and for the GPU's memory in use
# to return to what it was before. Prints PASS or FAIL (and then stops what is left itself).
# Needs .device-carry (cargo xtask device-build); run as root.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
carry=$PWD/${CARRY:-.device-carry}
# shellcheck source=device/lib.sh
. device/lib.sh
work=$(mktemp -d /tmp/vgpu-mps-kill.XXXXXX)
chmod 755 "$work"
sock=$work/sock/host-proxy.sock
leftovers() { pgrep -f 'nvidia-cuda-mps-(control|server)' | tr '\n' ' '; }
cleanup() {
    stop_daemon
    local pipe
    for pipe in $(find "$work/mps" -name control -printf '%h\n' 2>/dev/null); do
        echo quit | CUDA_MPS_PIPE_DIRECTORY=$pipe timeout 10 nvidia-cuda-mps-control >/dev/null 2>&1
    done
    pkill -P $$ 2>/dev/null || true
}
trap cleanup EXIT
if ! command -v nvidia-cuda-mps-control >/dev/null; then echo "SKIP: no nvidia-cuda-mps-control"; exit 0; fi
if [ -n "$(leftovers)" ]; then echo "FAIL: MPS daemons run already: $(leftovers)"; exit 1; fi
find_cuda_toolkit
stage_remoting "$carry" "$work"
gcc -std=c11 -O2 -Wall -I"$inc" device/probes/tenant_load.c -o "$work/tenant_load" -L"$stubs" -lcuda || exit 1
chmod -R a+rX "$work"
used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1; }
before=$(used)
write_daemon_config "$work/host-proxy.toml" "$sock" 'xen = "off"' "mps_dir = \"$work/mps\"" \
    '[[zone]]' 'name = "t1"' 'uid = 61001' 'sharing = "mps"' '[[zone]]' 'name = "t2"' 'uid = 61002' 'sharing = "mps"' \
    '[[sharing_group]]' 'name = "g"' 'zones = ["t1", "t2"]'
HOST_PROXY_LOG=info start_daemon "$work/host-proxy.log"
chmod 755 "$(dirname "$sock")"
chmod 666 "$sock"
timeout 60 setpriv --reuid=61001 --regid=61001 --clear-groups env LD_LIBRARY_PATH="$lib" VGPU_SOCKET="$sock" \
    VGPU_LOG=error "$work/tenant_load" launch 30 "$work/go" >"$work/tenant.out" 2>&1 &
tenant=$!
for _ in $(seq 1 300); do grep -qE '^(ready|mode=error)' "$work/tenant.out" && break; sleep 0.1; done
touch "$work/go"
sleep 1
echo "== GPU memory used before: $before MiB; with the zone running: $(used) MiB"
echo "== MPS processes: $(pgrep -af 'nvidia-cuda-mps-(control|server)' | awk '{print $1, $2}' | tr '\n' ';')"
[ -n "$(pgrep -f nvidia-cuda-mps-server)" ] || { echo "FAIL: no MPS server runs for the zone"; tail -n 20 "$work/host-proxy.log"; exit 1; }
kill -KILL "$hp"
wait "$hp" 2>/dev/null
hp=""
t0=$(date +%s.%N)
gone=""
for _ in $(seq 1 150); do
    if [ -z "$(leftovers)" ]; then gone=$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN { printf "%.1f", a - b }'); break; fi
    sleep 0.1
done
wait "$tenant" 2>/dev/null
echo "== the zone's program: exit $?, last line: $(tail -n 1 "$work/tenant.out")"
for _ in $(seq 1 50); do [ "$(used)" -le "$((before + 16))" ] && break; sleep 0.1; done
after=$(used)
echo "== GPU memory used after: $after MiB"
if [ -n "$gone" ] && [ "$after" -le "$((before + 16))" ]; then
    echo "PASS: the MPS control daemon and server exited ${gone} s after host-proxy was killed; GPU memory back to $after MiB"
else
    echo "FAIL: after 15 s still running: '$(leftovers)'; GPU memory $after MiB (before $before)"
    exit 1
fi
