#!/usr/bin/env bash
# On the GPU machine: where the remoted time of small calls and launches goes.
#
#  1. transport floor — idm-shm's round-trip benchmark (carried as shm_roundtrip): a bare
#     shared-memory ping-pong against a polled idm call, client and server on cores 0 and 1.
#  2. pinning — the bench's `calls` and `launch` groups (BENCH_ONLY) natively and remoted,
#     first unpinned (as libvgpu-bench.sh runs them), then with the program on one core and
#     host-proxy (and so its zone worker) on another, to separate scheduling and migration
#     from the per-request work.
#  3. request profile — the remoted `calls` and `launch` groups with host-proxy's
#     `profile_requests`: per request kind, the worker's service time (private copy in hand
#     to answer sent: decode, checks, driver call, reply) and the gap before each request.
#  4. perf — installed, or bundled by device/bundle-perf.sh and carried as
#     .device-carry-perf: the same groups with the daemon and its zone worker under
#     `perf record` (the worker's samples per shared object and its top symbols), the
#     program through libvgpu (the guest side), and the program natively.
#
# Carried (build here first: `cargo xtask device-build`): .device-carry/host-proxy,
# .device-carry/libvgpu/libcuda.so.1, .device-carry/shm_roundtrip (CARRY names another
# directory, e.g. a build of another commit for an A/B comparison). Results in
# /tmp/vgpu-profile-out; with $OUT set, copied there (profile.txt, perf-*.txt). PIN_APP and
# PIN_HOST choose the two cores of step 2 (default 2 and 3); PROFILE_ROUNDS repeats step 2
# (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
src=$root/guest-agent/libvgpu/bench
carry=$root/${CARRY:-.device-carry}
out=/tmp/vgpu-profile-out
sock=/tmp/vgpu-profile/host-proxy.sock
pin_app=${PIN_APP:-2}
pin_host=${PIN_HOST:-3}
rounds=${PROFILE_ROUNDS:-3}

for f in "$carry/host-proxy" "$carry/libvgpu/libcuda.so.1" "$carry/shm_roundtrip"; do
    if [ ! -f "$f" ]; then echo "FAIL: $f not carried (run cargo xtask device-build)" >&2; exit 1; fi
done
work=$(mktemp -d /tmp/vgpu-profile-work.XXXXXX)
rm -rf "$out"
mkdir -p "$out"

# shellcheck source=device/lib.sh
. device/lib.sh # find_cuda_toolkit, build_bench, stage_remoting, start_daemon/stop_daemon, require_libvgpu
on_exit() {
    stop_daemon
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        cp "$out"/*.txt "$OUT/" 2>/dev/null || true
    fi
}
trap on_exit EXIT

echo "== GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || echo '?')"
echo "== CPU: $(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1), $(nproc) cores"
find_cuda_toolkit
build_bench "$src" "$work"
stage_remoting "$carry" "$work"
require_libvgpu "$bin" "$lib"

# measure <label> <mode> [WRAPPER...]: one run of the calls and launch groups; prints the
# label and the measures.
measure() {
    local label=$1 mode=$2
    shift 2
    echo "-- $label"
    if [ "$mode" = native ]; then
        BENCH_ONLY=calls,launch timeout 120 "$@" "$bin" "$k" | grep -v '^#' || echo "(run failed)"
    else
        BENCH_ONLY=calls,launch LD_LIBRARY_PATH=$guest_ld VGPU_SOCKET=$sock VGPU_LOG=warn \
            timeout 120 "$@" "$bin" "$k" | grep -v '^#' || echo "(run failed)"
    fi
}

{
    echo "# 1. transport floor (idm-shm round trip, cores 0 and 1)"
    cp "$carry/shm_roundtrip" "$work/shm_roundtrip"
    chmod u+x "$work/shm_roundtrip"
    timeout 120 "$work/shm_roundtrip" --bench 2>&1 | grep -E 'ping-pong|call round trip|64 B' || echo "shm_roundtrip failed"

    echo
    echo "# 2. pinning (calls and launch groups, $rounds rounds)"
    for r in $(seq 1 "$rounds"); do
        measure "round $r: native, unpinned" native
        start_daemon "$out/host-proxy-unpinned.log"
        measure "round $r: remoted, unpinned" remoted
        stop_daemon
        measure "round $r: native, program on cpu $pin_app" native taskset -c "$pin_app"
        start_daemon "$out/host-proxy-pinned.log" taskset -c "$pin_host"
        measure "round $r: remoted, program on cpu $pin_app, host-proxy on cpu $pin_host" remoted taskset -c "$pin_app"
        stop_daemon
    done

    echo
    echo "# 3. request profile (profile_requests; unpinned)"
    write_daemon_config "$work/host-proxy.toml" "$sock" "profile_requests = true"
    start_daemon "$out/host-proxy-profile.log"
    measure "remoted with profile_requests" remoted
    # The worker logs its profile once it sees the program gone; give it that moment
    # before the daemon (and with it the worker) is stopped.
    for _ in $(seq 1 50); do
        grep -q 'request profile' "$out/host-proxy-profile.log" && break
        sleep 0.1
    done
    sleep 0.2
    stop_daemon
    sed -n 's/.*request profile: //p' "$out/host-proxy-profile.log"
    write_daemon_config "$work/host-proxy.toml" "$sock"
} 2>&1 | tee "$out/profile.txt"

echo
echo "# 4. perf profile of the zone worker" | tee -a "$out/profile.txt"
# The machine's perf, else one bundled by device/bundle-perf.sh and carried.
perf_cmd=""
if command -v perf >/dev/null 2>&1; then
    perf_cmd=$(command -v perf)
elif [ -x "$root/.device-carry-perf/run-perf" ]; then
    perf_cmd=$root/.device-carry-perf/run-perf
fi
if [ -z "$perf_cmd" ]; then
    echo "perf is neither installed nor carried (device/bundle-perf.sh): no profile" | tee -a "$out/profile.txt"
    exit 0
fi
for group in calls launch; do
    data=$out/perf-$group.data
    # Flat samples (no call graphs: the carried binaries have no frame pointers).
    start_daemon "$out/host-proxy-perf-$group.log" "$perf_cmd" record -F 20000 -o "$data" --
    # Repeated, so the group's work outweighs start-up (registering the data window).
    repeat=10
    [ "$group" = calls ] && repeat=40
    BENCH_ONLY=$group BENCH_REPEAT=$repeat LD_LIBRARY_PATH=$guest_ld VGPU_SOCKET=$sock VGPU_LOG=warn \
        timeout 120 "$bin" "$k" >"$out/perf-$group-bench.txt" 2>&1 || echo "bench under perf failed ($group)"
    # perf record writes its data when it is stopped by a signal.
    kill -INT "$hp" 2>/dev/null || true
    wait "$hp" 2>/dev/null || true
    hp=""
    {
        echo "## $group: the zone worker's samples per shared object"
        "$perf_cmd" report -i "$data" --no-children --comm host-proxy --sort dso --stdio 2>/dev/null |
            grep -v '^#' | grep -v '^$' | head -n 12 || true
        echo "## $group: the zone worker's top symbols"
        "$perf_cmd" report -i "$data" --no-children --comm host-proxy --sort dso,sym --stdio 2>/dev/null |
            grep -v '^#' | grep -v '^$' | head -n 45 || true
    } >"$out/perf-$group.txt" 2>&1
    tee -a "$out/profile.txt" <"$out/perf-$group.txt"
    # The guest side of the same work: the program through libvgpu.
    start_daemon "$out/host-proxy-perf-guest-$group.log"
    "$perf_cmd" record -F 20000 -o "$out/perf-guest-$group.data" -- env BENCH_ONLY=$group BENCH_REPEAT=$repeat \
        LD_LIBRARY_PATH=$guest_ld VGPU_SOCKET=$sock VGPU_LOG=warn \
        timeout 120 "$bin" "$k" >"$out/perf-guest-$group-bench.txt" 2>&1 || echo "remoted bench under perf failed ($group)"
    stop_daemon
    {
        echo "## $group, the program through libvgpu: samples per shared object"
        "$perf_cmd" report -i "$out/perf-guest-$group.data" --no-children --comm bench --sort dso --stdio 2>/dev/null |
            grep -v '^#' | grep -v '^$' | head -n 12 || true
        echo "## $group, the program through libvgpu: top symbols"
        "$perf_cmd" report -i "$out/perf-guest-$group.data" --no-children --comm bench --sort dso,sym --stdio 2>/dev/null |
            grep -v '^#' | grep -v '^$' | head -n 30 || true
    } >"$out/perf-guest-$group.txt" 2>&1
    tee -a "$out/profile.txt" <"$out/perf-guest-$group.txt"
    # The same work natively, for comparison: how much of the driver's time is its own.
    "$perf_cmd" record -F 20000 -o "$out/perf-native-$group.data" -- env BENCH_ONLY=$group BENCH_REPEAT=$repeat \
        timeout 120 "$bin" "$k" >"$out/perf-native-$group-bench.txt" 2>&1 || echo "native bench under perf failed ($group)"
    {
        echo "## $group, native: the program's samples per shared object"
        "$perf_cmd" report -i "$out/perf-native-$group.data" --no-children --sort dso --stdio 2>/dev/null |
            grep -v '^#' | grep -v '^$' | head -n 12 || true
        echo "## $group, native: top symbols"
        "$perf_cmd" report -i "$out/perf-native-$group.data" --no-children --sort dso,sym --stdio 2>/dev/null |
            grep -v '^#' | grep -v '^$' | head -n 25 || true
    } >"$out/perf-native-$group.txt" 2>&1
    tee -a "$out/profile.txt" <"$out/perf-native-$group.txt"
done
