#!/usr/bin/env bash
# On the GPU machine: issue 15's PyTorch checks that judge themselves (each part compares with
# the CPU), natively and through libvgpu + host-proxy (cuda backend, local transport).
# PASS when every part passes in both runs and both exit 0; prints both runs' part lines.
# Checks: device/probes/torch_threads.py (threads and streams, events, priorities, autograd in
# threads, DataLoader's pinning thread, record_stream, a child process's clean exit) and
# device/probes/torch_fft.py (cuFFT 1-D and 2-D real, strided copies). A run whose stderr tells
# of a libvgpu internal error (a panic, even one caught at the C boundary) fails too.
# CHECK_TIMEOUT is each run's limit (300 s); CHECK_VGPU_LOG is libvgpu's VGPU_LOG (warn);
# CHECK_TRACEBACK=1 prints a failed part's traceback. With $OUT set, each run's output and the
# daemon's log come back. Needs `cargo xtask device-build`'s .device-carry.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
carry=$PWD/${CARRY:-.device-carry}
# shellcheck source=device/lib.sh
. device/lib.sh
work=$(mktemp -d /tmp/vgpu-torch-check.XXXXXX)
sock=$work/sock/host-proxy.sock
out=${OUT:-$work}
trap stop_daemon EXIT
stage_remoting "$carry" "$work"
start_daemon "$work/host-proxy.log"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__)'
verdict=PASS
for probe in torch_threads torch_fft; do
    for mode in native libvgpu; do
        echo "== $probe, $mode"
        if [ "$mode" = native ]; then
            env CHECK_TRACEBACK="${CHECK_TRACEBACK:-}" timeout "${CHECK_TIMEOUT:-300}" \
                python3 "device/probes/$probe.py" >"$out/$probe-$mode.txt" 2>"$out/$probe-$mode.err"
        else
            env CHECK_TRACEBACK="${CHECK_TRACEBACK:-}" LD_LIBRARY_PATH="$guest_ld" VGPU_SOCKET="$sock" \
                VGPU_LOG="${CHECK_VGPU_LOG:-warn}" timeout "${CHECK_TIMEOUT:-300}" \
                python3 "device/probes/$probe.py" >"$out/$probe-$mode.txt" 2>"$out/$probe-$mode.err"
        fi
        rc=$?
        cat "$out/$probe-$mode.txt"
        if [ "$rc" -ne 0 ] || grep -q '^FAIL' "$out/$probe-$mode.txt" ||
            grep -q 'internal error (panic)' "$out/$probe-$mode.err"; then
            verdict=FAIL
            echo "-- exit $rc; stderr:"; tail -n 20 "$out/$probe-$mode.err"
        fi
    done
done
if ! kill -0 "$hp" 2>/dev/null; then
    echo "FAIL: host-proxy died"; tail -n 30 "$work/host-proxy.log"; verdict=FAIL
fi
[ "$out" = "$work" ] || cp "$work/host-proxy.log" "$out/host-proxy.log"
echo "torch checks: $verdict"
[ "$verdict" = PASS ]
