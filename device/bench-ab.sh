#!/usr/bin/env bash
# On the GPU machine: an A/B of the request path's cost between two builds —
# device/libvgpu-bench.sh with the build in $BASE (default .device-carry-base, e.g. an
# earlier commit's host-proxy and libvgpu) and with .device-carry (this build), alternating,
# PAIRS times (default 2), each with BENCH_ROUNDS rounds (default 3) of BENCH_ONLY (default
# calls,launch,graph). Both builds run with the same metrics endpoint and scraper
# (METRICS_SCRAPE_S, see libvgpu-bench.sh). Tables in $OUT/{base,new}-<pair>.txt, the new
# build's last scrape in $OUT/metrics-new-<pair>.txt. BASE_COMMIT and NEW_COMMIT name the
# builds in the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
base=${BASE:-.device-carry-base}
pairs=${PAIRS:-2}
export BENCH_ROUNDS=${BENCH_ROUNDS:-3} BENCH_ONLY=${BENCH_ONLY:-calls,launch,graph}
out=${OUT:-/tmp/vgpu-bench-ab}
mkdir -p "$out"
for p in $(seq 1 "$pairs"); do
    for side in base new; do
        carry=$base commit=${BASE_COMMIT:-base}
        if [ "$side" = new ]; then carry=.device-carry commit=${NEW_COMMIT:-new}; fi
        echo "== pair $p: $side ($carry)"
        CARRY=$carry BENCH_COMMIT=$commit OUT= timeout 280 bash device/libvgpu-bench.sh >"$out/$side-$p.log" 2>&1 || echo "  ($side run of pair $p failed: see $side-$p.log)"
        cp /tmp/vgpu-bench-out/bench.txt "$out/$side-$p.txt" 2>/dev/null || true
        [ "$side" = new ] && cp /tmp/vgpu-bench-out/metrics-1.txt "$out/metrics-new-$p.txt" 2>/dev/null || true
        tail -n 12 "$out/$side-$p.txt" 2>/dev/null || tail -n 20 "$out/$side-$p.log"
    done
done
