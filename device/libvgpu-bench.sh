#!/usr/bin/env bash
# On the GPU machine: native-versus-remoted benchmark of the CUDA driver API. Builds
# guest-agent/libvgpu/bench (bench.c and bench_kernels.cu) with nvcc, then runs it twice in
# alternation: natively (real libcuda), then through libvgpu against a host-proxy with the cuda
# backend (started for each remoted run, without libvgpu on its library path, and stopped
# after it, so the native runs see an idle machine). Prints a side-by-side table per round
# (name, unit, native, remoted, remoted/native, which way is better), with the GPU, driver and
# date.
#
# Carried (build here first: `cargo xtask device-build`): .device-carry/host-proxy and
# .device-carry/libvgpu/libcuda.so.1 (CARRY names another directory, e.g. a build of another
# commit for an A/B comparison). Results in /tmp/vgpu-bench-out (raw outputs, table,
# host-proxy logs); when $OUT is set, $OUT gets bench.txt (the table), raw.txt (the four raw
# outputs) and host-proxy.log. BENCH_COMMIT names the measured commit in the table (else
# git's HEAD, which on a copied tree may be stale); BENCH_ROUNDS sets the rounds (default
# 2). HOST_PROXY_BACKEND=sim (a dry run of the script itself off a GPU machine) gives the
# daemon the simulated test double instead. The daemon serves its Prometheus metrics on
# loopback and a scraper reads them every METRICS_SCRAPE_S seconds (default 1; 0: no
# metrics endpoint) while the remoted program runs, as an operator's Prometheus would (more
# often): the measured cost includes the per-request statistics and their scrapes. The last
# scrape of each round goes to metrics-<round>.txt ($OUT too).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
src=$root/guest-agent/libvgpu/bench
carry=$root/${CARRY:-.device-carry}
out=/tmp/vgpu-bench-out
sock=/tmp/vgpu-bench/host-proxy.sock
rounds=${BENCH_ROUNDS:-2}

for f in "$carry/host-proxy" "$carry/libvgpu/libcuda.so.1"; do
    if [ ! -f "$f" ]; then echo "FAIL: $f not carried (run cargo xtask device-build)" >&2; exit 1; fi
done

work=$(mktemp -d /tmp/vgpu-bench-work.XXXXXX)
rm -rf "$out"
mkdir -p "$out"

# shellcheck source=device/lib.sh
. device/lib.sh # find_cuda_toolkit, build_bench, start_daemon/stop_daemon ($hp), require_libvgpu; run from the repository root
on_exit() {
    stop_daemon
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        [ -f "$out/bench.txt" ] && cp "$out/bench.txt" "$OUT/"
        for f in "$out"/native-*.txt "$out"/remoted-*.txt; do
            [ -f "$f" ] && { echo "==> $(basename "$f")"; cat "$f"; }
        done >"$OUT/raw.txt" 2>/dev/null || true
        cat "$out"/host-proxy-*.log >"$OUT/host-proxy.log" 2>/dev/null || true
        cp "$out"/metrics-*.txt "$OUT/" 2>/dev/null || true
    fi
}
trap on_exit EXIT

gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1 || true)
gpu=${gpu:-"nvidia-smi failed"}
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -n 1 || true)
echo "== GPU: $gpu"
echo "== CPU: ${cpu:-?}, $(nproc) cores"

# ---- toolkit ----
find_cuda_toolkit

# ---- build ----
build_bench "$src" "$work" # sets $bin and $k

# ---- libvgpu and host-proxy ----
stage_remoting "$carry" "$work" # sets $lib and $guest_ld
scrape_every=${METRICS_SCRAPE_S:-1}
metrics_port=9464
if [ "$scrape_every" != 0 ]; then
    write_daemon_config "$work/host-proxy.toml" "$sock" "metrics_listen = \"127.0.0.1:$metrics_port\""
fi
require_libvgpu "$bin" "$lib"

# scrape <file>: one GET /metrics from the daemon (bash's /dev/tcp, bounded), body to <file>.
scrape() {
    timeout 5 bash -c "exec 3<>/dev/tcp/127.0.0.1/$metrics_port && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3" \
        2>/dev/null | tr -d '\r' | sed '1,/^$/d' >"$1.tmp" && [ -s "$1.tmp" ] && mv "$1.tmp" "$1"
}

# run_bench <native|remoted> <round>: output in $out/<mode>-<round>.txt; never fails the
# script (a failed run leaves its partial output and an `exit status` line).
run_bench() {
    local mode=$1 r=$2 rc=0 f=$out/$1-$2.txt scraper=""
    if [ "$mode" = native ]; then
        timeout 180 "$bin" "$k" >"$f" 2>"$out/$mode-$r.err" || rc=$?
    else
        if [ "$scrape_every" != 0 ]; then
            (while sleep "$scrape_every"; do scrape "$out/metrics-$r.txt" || true; done) &
            scraper=$!
        fi
        LD_LIBRARY_PATH=$guest_ld VGPU_SOCKET=$sock VGPU_LOG=warn \
            timeout 180 "$bin" "$k" >"$f" 2>"$out/$mode-$r.err" || rc=$?
        if [ -n "$scraper" ]; then
            kill "$scraper" 2>/dev/null || true
            wait "$scraper" 2>/dev/null || true
            scrape "$out/metrics-$r.txt" || echo "  (no metrics scrape after round $r)"
        fi
    fi
    echo "# exit status: $rc" >>"$f"
    if [ "$rc" -ne 0 ]; then any_fail=1; fi
    printf '  round %s %-8s exit %s  (%s measures)\n' "$r" "$mode" "$rc" "$(grep -cv '^#' "$f" || true)"
    if [ "$rc" -ne 0 ]; then
        echo "  last lines:"; tail -n 5 "$f" | sed 's/^/    /'
        sed 's/^/    stderr: /' "$out/$mode-$r.err" | tail -n 5
    fi
}

any_fail=0
echo "== runs (native and remoted alternately, $rounds rounds)"
for r in $(seq 1 "$rounds"); do
    run_bench native "$r"
    start_daemon "$out/host-proxy-$r.log"
    run_bench remoted "$r"
    stop_daemon
done

# ---- table ----
# The device machine's copy of the tree may carry a stale .git: the caller's BENCH_COMMIT wins.
commit=${BENCH_COMMIT:-$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)}
# table <round>...: the side-by-side table of those rounds — each side's median, the median
# of the rounds' ratios, and (over several rounds) the ratios of the rounds.
table() {
    local nats="" rems="" r
    for r in "$@"; do nats="$nats $out/native-$r.txt"; rems="$rems $out/remoted-$r.txt"; done
    awk -v nats="$nats" -v rems="$rems" '
        function load(file, side, r,   line, f) {
            while ((getline line < file) > 0) {
                # Measures only: `name value unit`; comments and FAIL lines are skipped.
                if (split(line, f, " ") != 3 || f[2] !~ /^[0-9.eE+-]+$/) continue
                if (!(f[1] in unit)) { order[++n] = f[1]; unit[f[1]] = f[3] }
                val[side, r, f[1]] = f[2]
            }
            close(file)
        }
        function median(a, k,   i, j, t) { # sorts a[1..k] in place
            for (i = 2; i <= k; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
            return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
        }
        function fmt(v) {
            return v >= 1000 ? sprintf("%.0f", v) : v >= 10 ? sprintf("%.1f", v) : sprintf("%.3f", v)
        }
        BEGIN {
            rounds = split(nats, nf, " "); split(rems, rf, " ")
            for (r = 1; r <= rounds; r++) { load(nf[r], "n", r); load(rf[r], "r", r) }
            several = rounds > 1
            print "| measure | unit | native | remoted | ratio |" (several ? " ratios of the rounds |" : "") " better |"
            print "|---|---|---|---|---|" (several ? "---|" : "") "---|"
            for (i = 1; i <= n; i++) {
                m = order[i]; kn = kr = kq = 0; list = ""
                for (r = 1; r <= rounds; r++) {
                    if (("n", r, m) in val) na[++kn] = val["n", r, m]
                    if (("r", r, m) in val) ra[++kr] = val["r", r, m]
                    if ((("n", r, m) in val) && (("r", r, m) in val) && val["n", r, m] > 0) {
                        q = val["r", r, m] / val["n", r, m]; qa[++kq] = q
                        list = list (list == "" ? "" : " ") sprintf("%.2f", q)
                    }
                }
                better = (unit[m] == "GB/s" || unit[m] == "GFLOP/s") ? "higher" : "lower"
                printf "| %s | %s | %s | %s | %s |", m, unit[m], kn ? fmt(median(na, kn)) : "-",
                    kr ? fmt(median(ra, kr)) : "-", kq ? sprintf("%.2f", median(qa, kq)) : "-"
                if (several) printf " %s |", list == "" ? "-" : list
                printf " %s |\n", better
            }
        }'
}
{
    echo "libvgpu benchmark: native libcuda vs libvgpu + host-proxy (cuda backend, local shm transport)"
    echo "GPU: $gpu"
    echo "CPU: ${cpu:-?}, $(nproc) cores"
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')   commit: $commit"
    echo "ratio = remoted / native; 'better' says which way is better for the measure"
    for r in $(seq 1 "$rounds"); do
        echo
        echo "round $r"
        echo
        table "$r"
        for mode in native remoted; do
            st=$(sed -n 's/^# exit status: //p' "$out/$mode-$r.txt")
            [ "$st" = 0 ] || echo "($mode run of round $r exited with status $st: its table entries are partial)"
        done
    done
    if [ "$rounds" -ge 2 ]; then
        echo
        echo "over the $rounds rounds: medians of each side, and the median of the rounds' ratios"
        echo "(each round's pair ran back to back, so its ratio is the least disturbed by the machine)"
        echo
        # shellcheck disable=SC2046 # the round numbers are words on purpose
        table $(seq 1 "$rounds")
    fi
} >"$out/bench.txt"
echo
cat "$out/bench.txt"
if [ "$any_fail" -ne 0 ]; then echo "libvgpu bench: FAIL (a run failed; see above)"; exit 1; fi
echo "libvgpu bench: all runs completed"
