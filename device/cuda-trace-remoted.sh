#!/usr/bin/env bash
# On the GPU machine: device/cuda-trace.sh with libvgpu behind the tracer instead of the real
# driver — the program's calls and their results through libvgpu + host-proxy (cuda backend),
# to set beside a native trace of the same program when a library fails only through libvgpu.
#
# Usage: device/cuda-trace-remoted.sh 'COMMAND LINE' ['COMMAND LINE'...]
# Carried: .device-carry (cargo xtask device-build): libvgpu, host-proxy and the tracer.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
carry=$PWD/${CARRY:-.device-carry}
# shellcheck source=device/lib.sh
. device/lib.sh # stage_remoting, start_daemon/stop_daemon
work=$(mktemp -d /tmp/vgpu-trace-remoted.XXXXXX)
sock=$work/sock/host-proxy.sock
trap stop_daemon EXIT
stage_remoting "$carry" "$work"
start_daemon "$work/host-proxy.log" || exit 1
VGPU_SOCKET=$sock VGPU_TRACE_REAL=$lib/libcuda.so.1 bash device/cuda-trace.sh "$@"
rc=$?
echo "== host-proxy log (warnings and errors)"
grep -E "WARN|ERROR" "$work/host-proxy.log" | tail -n 20
exit "$rc"
