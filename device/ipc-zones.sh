#!/usr/bin/env bash
# On the GPU machine: the seeds' CUDA IPC flow between two *zones* through libvgpu and
# host-proxy (cuda backend). The producer runs as root (zone "producer"), the consumer as
# uid 65534 (zone "consumer", same sharing group), an outsider as uid 65533 (zone
# "outsider", no shared group) which must get CUDA_ERROR_NOT_PERMITTED.
# Carried (build here with `cargo xtask device-build`): .device-carry/{host-proxy,cudarc_app,libvgpu/libcuda.so.1}.
set -euo pipefail
cd "$(dirname "$0")/.."
carry=$PWD/.device-carry
work=$(mktemp -d /tmp/vgpu-ipc.XXXXXX)
chmod 755 "$work"
mkdir -p "$work/lib"
cp "$carry/libvgpu/libcuda.so.1" "$carry/cudarc_app" "$carry/host-proxy" "$work/"
ln -sf "$work/libcuda.so.1" "$work/lib/libcuda.so.1"
ln -sf libcuda.so.1 "$work/lib/libcuda.so"
chmod -R a+rX "$work"
sock=$work/host-proxy.sock
cat >"$work/host-proxy.toml" <<TOML
socket = "$sock"
backend = "cuda"
device = 0

[[zone]]
name = "producer"
uid = 0

[[zone]]
name = "consumer"
uid = 65534

[[zone]]
name = "outsider"
uid = 65533

[[sharing_group]]
name = "pipeline"
zones = ["producer", "consumer"]
TOML
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
VGPU_LOG=info "$work/host-proxy" serve --config "$work/host-proxy.toml" >"$work/host-proxy.log" 2>&1 &
hp=$!
trap 'kill $hp 2>/dev/null || true; wait $hp 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
chmod 777 "$sock"
app() { env LD_LIBRARY_PATH="$work/lib" VGPU_SOCKET="$sock" VGPU_LOG=warn "$@"; }
as_uid() { local u=$1; shift; setpriv --reuid="$u" --regid="$u" --clear-groups "$@"; }
coproc PRODUCER { app "$work/cudarc_app" ipc-export; }
producer_pid=$PRODUCER_PID
exec {from_producer}<&"${PRODUCER[0]}" {to_producer}>&"${PRODUCER[1]}"
read -r -u "$from_producer" line
handle=${line#handle }
echo "producer: exported (handle of ${#handle} hex digits)"
echo "== outsider (uid 65533, no shared group)"
as_uid 65533 env LD_LIBRARY_PATH="$work/lib" VGPU_SOCKET="$sock" VGPU_LOG=warn "$work/cudarc_app" ipc-open "$handle" denied
echo "== consumer (uid 65534, sharing group 'pipeline')"
as_uid 65534 env LD_LIBRARY_PATH="$work/lib" VGPU_SOCKET="$sock" VGPU_LOG=warn "$work/cudarc_app" ipc-open "$handle"
echo done >&"$to_producer"
cat <&"$from_producer"
wait "$producer_pid"
echo "ipc across zones: PASS"
grep -E "zone started" "$work/host-proxy.log" | sed 's/\x1b\[[0-9;]*m//g' | head -5 || true
