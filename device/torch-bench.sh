#!/usr/bin/env bash
# On the GPU machine: issue 15's PyTorch benchmark, natively and through libvgpu + host-proxy
# (cuda backend, local transport) side by side in one run. device/probes/torch_bench.py runs
# BENCH_ROUNDS times in each mode (default 3), native and remoted in alternation, each run
# BENCH_REPS timed repetitions per workload (default 5). Prints per workload and mode the
# median [min–max] over all repetitions, the ratio of the medians (remoted ÷ native for
# times, native ÷ remoted for tokens/s, so > 1 is slower either way) and whether the
# workload's check value agreed. Needs `cargo xtask device-build`'s .device-carry.
# BENCH_ONLY="mlp_train_step …" limits the workloads (gpt2_generate_graphs, which compiles
# the model, runs only when named there); BENCH_TIMEOUT is each run's limit (240 s);
# BENCH_VGPU_LOG is libvgpu's VGPU_LOG (warn; debug names every call that failed). With $OUT
# set, the raw lines and the daemon's log come back as torch-bench.txt and host-proxy.log,
# each run's stderr as MODE-ROUND.err (BENCH_TRACEBACK=1: with a failed workload's traceback).
# BENCH_METRICS=1 serves the daemon's metrics on loopback and has the remoted runs print, for
# the generate workloads, which requests reached the host per token and their mean time
# (`requests …` lines; the scrapes fall outside the timed repetitions).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
carry=$PWD/${CARRY:-.device-carry}
# shellcheck source=device/lib.sh
. device/lib.sh
rounds=${BENCH_ROUNDS:-3}
work=$(mktemp -d /tmp/vgpu-torch-bench.XXXXXX)
sock=$work/sock/host-proxy.sock
out=${OUT:-$work}
trap stop_daemon EXIT
stage_remoting "$carry" "$work"
metrics_env=()
if [ "${BENCH_METRICS:-0}" = 1 ]; then
    write_daemon_config "$work/host-proxy.toml" "$sock" 'metrics_listen = "127.0.0.1:9469"'
    metrics_env=(BENCH_METRICS_URL=http://127.0.0.1:9469/metrics)
fi
start_daemon "$work/host-proxy.log"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
raw=$out/torch-bench.txt
: >"$raw"
for r in $(seq 1 "$rounds"); do
    for mode in native libvgpu; do
        echo "== round $r, $mode"
        if [ "$mode" = native ]; then
            env BENCH_REPS="${BENCH_REPS:-5}" timeout "${BENCH_TIMEOUT:-240}" python3 device/probes/torch_bench.py >"$work/run.txt" 2>"$work/run.err"
        else
            env BENCH_REPS="${BENCH_REPS:-5}" "${metrics_env[@]}" LD_LIBRARY_PATH="$guest_ld" VGPU_SOCKET="$sock" VGPU_LOG="${BENCH_VGPU_LOG:-warn}" \
                timeout "${BENCH_TIMEOUT:-240}" python3 device/probes/torch_bench.py >"$work/run.txt" 2>"$work/run.err"
        fi
        rc=$?
        [ "$out" = "$work" ] || cp "$work/run.err" "$out/$mode-$r.err"
        grep -E '^(FAIL|bench done|requests|[a-z0-9_]+: compiled)' "$work/run.txt"
        [ "$rc" -eq 0 ] || { echo "-- exit $rc; stderr:"; tail -n 15 "$work/run.err"; }
        sed -n "s/^result /$mode $r /p" "$work/run.txt" >>"$raw"
    done
    if ! kill -0 "$hp" 2>/dev/null; then
        echo "FAIL: host-proxy died"; tail -n 30 "$work/host-proxy.log"; exit 1
    fi
done
[ "$out" = "$work" ] || cp "$work/host-proxy.log" "$out/host-proxy.log"
python3 - "$raw" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    mode, _round, name, value, unit, check = line.split()
    rows.setdefault(name, {"unit": unit}).setdefault(mode, []).append((float(value), float(check)))
print(f"{'workload':18} {'unit':9} {'native median [min-max]':28} {'libvgpu median [min-max]':28} ratio  checks")
for name, r in rows.items():
    if "native" not in r or "libvgpu" not in r:
        print(f"{name:18} missing a mode: {sorted(k for k in r if k != 'unit')}")
        continue
    def summary(mode):
        v = [x for x, _ in r[mode]]
        return statistics.median(v), min(v), max(v)
    n, v = summary("native"), summary("libvgpu")
    ratio = n[0] / v[0] if r["unit"] == "tokens/s" else v[0] / n[0]
    checks = "same" if {c for _, c in r["native"]} == {c for _, c in r["libvgpu"]} else \
        f"differ: native {sorted({c for _, c in r['native']})} libvgpu {sorted({c for _, c in r['libvgpu']})}"
    fmt = lambda s: f"{s[0]:.4g} [{s[1]:.4g}-{s[2]:.4g}]"
    print(f"{name:18} {r['unit']:9} {fmt(n):28} {fmt(v):28} {ratio:.3f}  {checks}")
EOF
