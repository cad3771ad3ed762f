#!/usr/bin/env bash
# On the GPU machine: an A/B of the request path's cost between two builds —
# device/libvgpu-bench.sh with the build in $BASE (default .device-carry-base, e.g. an
# earlier commit's host-proxy and libvgpu) and with .device-carry (this build), alternating,
# PAIRS times (default 2), each with BENCH_ROUNDS rounds (default 3) of BENCH_ONLY (default
# calls,launch,graph). Both builds run with the same metrics endpoint and scraper
# (METRICS_SCRAPE_S, see libvgpu-bench.sh). Tables in $OUT/{base,new}-<pair>.txt, the new
# build's last scrape in $OUT/metrics-new-<pair>.txt; $OUT/ab.txt has every table and, per
# measure and build, the median and range of all its rounds' remoted/native ratios.
# BASE_COMMIT and NEW_COMMIT name the builds in the tables.
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

# ---- summary: every round's ratio, per measure and build ----
{
    echo "A/B: base ${BASE_COMMIT:-base} against new ${NEW_COMMIT:-new}, $pairs pairs of $BENCH_ROUNDS rounds, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "per measure: median [min-max] of the rounds' remoted/native ratios (n rounds)"
    echo
    for side in base new; do
        for p in $(seq 1 "$pairs"); do
            # The last table of each run (over its rounds): `| measure | unit | native | remoted | ratio | ratios | better |`.
            f=$out/$side-$p.txt
            [ -f "$f" ] && sed -n '/^over the/,$p' "$f" | awk -F'|' -v side="$side" 'NF >= 8 && $2 !~ /measure|---/ { print side, $2, $7 }'
        done
    done | awk '
        { side = $1; m = $2; for (i = 3; i <= NF; i++) { k = side SUBSEP m; n[k]++; v[k, n[k]] = $i }; if (!(m in seen)) { seen[m] = 1; order[++nm] = m } }
        function stat(k,   i, j, t, a, c) {
            c = n[k]; if (!c) return "-"
            for (i = 1; i <= c; i++) a[i] = v[k, i]
            for (i = 2; i <= c; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
            return sprintf("%.2f [%.2f-%.2f] (%d)", c % 2 ? a[(c + 1) / 2] : (a[c / 2] + a[c / 2 + 1]) / 2, a[1], a[c], c)
        }
        END {
            printf "| measure | base | new |\n|---|---|---|\n"
            for (i = 1; i <= nm; i++) printf "| %s | %s | %s |\n", order[i], stat("base" SUBSEP order[i]), stat("new" SUBSEP order[i])
        }'
    echo
    for side in base new; do
        for p in $(seq 1 "$pairs"); do
            echo "==> $side-$p"
            cat "$out/$side-$p.txt" 2>/dev/null || echo "(no table)"
        done
    done
} >"$out/ab.txt"
sed -n '1,/^==> /p' "$out/ab.txt" | head -n -1
