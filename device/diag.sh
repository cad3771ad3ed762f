#!/usr/bin/env bash
# On the GPU machine: runs each given command line natively and then through libvgpu +
# host-proxy (cuda backend, local transport), and keeps both runs' whole stdout and stderr and
# the daemon's log, for finding out why a program differs. Nothing is compared or judged here
# (cuda-samples.sh and cudart-gpu.sh do that); the tails are printed and, with $OUT set, the
# full logs come back as diag.tgz.
#
# Usage: device/diag.sh 'COMMAND LINE' ['COMMAND LINE'...]   (each run by bash -c, in the
# checkout's root; $TOOLKIT_LIB is the toolkit's library folder, $NVCC its nvcc)
# Knobs: DIAG_ENV='A=1 B=2' (both runs), DIAG_VGPU_LOG (libvgpu's VGPU_LOG, default debug),
# HOST_PROXY_LOG (the daemon's, default debug), DIAG_TIMEOUT (seconds per run, default 120),
# DIAG_BUILD='COMMAND LINE' (run once first, e.g. to build the programs; $DIAG_WORK is a
# scratch folder for them), DIAG_TAIL (lines of each log printed, default 40).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
carry=$PWD/${CARRY:-.device-carry}
# shellcheck source=device/lib.sh
. device/lib.sh # find_cuda_toolkit, stage_remoting, start_daemon/stop_daemon
if [ "$#" -eq 0 ]; then echo "usage: $0 'COMMAND LINE' ['COMMAND LINE'...]" >&2; exit 2; fi
work=$(mktemp -d /tmp/vgpu-diag.XXXXXX)
sock=$work/sock/host-proxy.sock
trap stop_daemon EXIT
find_cuda_toolkit
TOOLKIT_LIB=""
for d in "$cuda_home/lib64" "$cuda_home/targets/x86_64-linux/lib"; do
    if [ -f "$d/libcudart.so" ]; then TOOLKIT_LIB=$d; break; fi
done
export TOOLKIT_LIB NVCC=$nvcc DIAG_WORK=$work/build
mkdir -p "$DIAG_WORK" "$work/logs"
tail_n=${DIAG_TAIL:-40}
if [ -n "${DIAG_BUILD:-}" ]; then
    echo "== build: $DIAG_BUILD"
    if ! timeout 300 bash -c "$DIAG_BUILD" >"$work/logs/build.log" 2>&1; then
        tail -n "$tail_n" "$work/logs/build.log"
        echo "FAIL: build"
        exit 1
    fi
fi
stage_remoting "$carry" "$work"
HOST_PROXY_LOG=${HOST_PROXY_LOG:-debug} start_daemon "$work/logs/host-proxy.log"
n=0
for cmd in "$@"; do
    n=$((n + 1))
    echo "==== [$n] $cmd"
    # shellcheck disable=SC2086 # DIAG_ENV is a list of assignments
    env ${DIAG_ENV:-} LD_LIBRARY_PATH=$TOOLKIT_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
        timeout "${DIAG_TIMEOUT:-120}" bash -c "$cmd" >"$work/logs/$n.native.out" 2>"$work/logs/$n.native.err"
    echo "-- native: exit $?; stdout (last $tail_n lines):"
    tail -n "$tail_n" "$work/logs/$n.native.out"
    echo "-- native stderr:"
    tail -n "$tail_n" "$work/logs/$n.native.err"
    # shellcheck disable=SC2086
    env ${DIAG_ENV:-} LD_LIBRARY_PATH=$lib:$TOOLKIT_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} VGPU_SOCKET=$sock \
        VGPU_LOG=${DIAG_VGPU_LOG:-debug} timeout "${DIAG_TIMEOUT:-120}" bash -c "$cmd" \
        >"$work/logs/$n.libvgpu.out" 2>"$work/logs/$n.libvgpu.err"
    echo "-- libvgpu: exit $?; stdout (last $tail_n lines):"
    tail -n "$tail_n" "$work/logs/$n.libvgpu.out"
    echo "-- libvgpu stderr (last $tail_n lines):"
    tail -n "$tail_n" "$work/logs/$n.libvgpu.err"
    if ! kill -0 "$hp" 2>/dev/null; then
        echo "-- host-proxy died; restarting"
        HOST_PROXY_LOG=${HOST_PROXY_LOG:-debug} start_daemon "$work/logs/host-proxy.$n.log"
    fi
done
echo "== host-proxy log (warnings and errors)"
grep -E "WARN|ERROR" "$work"/logs/host-proxy*.log | tail -n "$tail_n"
if [ -n "${OUT:-}" ]; then
    tar -C "$work" -czf "$OUT/diag.tgz" logs
    echo "== logs in diag.tgz"
fi
