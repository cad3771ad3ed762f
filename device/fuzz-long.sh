#!/usr/bin/env bash
# Long fuzz runs on a many-core machine (the GPU machine's CPUs; no GPU is used). Build here
# first with `bash device/stage-fuzz.sh` (cargo-fuzz binaries of both fuzz workspaces and
# their committed corpora, in .device-carry-fuzz), carry .device-carry-fuzz, then:
#   FUZZ_SECONDS=540 bash device/fuzz-long.sh
# Each target runs in libFuzzer's fork mode with FUZZ_JOBS_<target> workers (default 2;
# zone_requests 6) for FUZZ_SECONDS; FUZZ_ONLY="a b" runs only those targets. Prints each
# target's totals; under $OUT: the logs, the crashes (if any) and the grown corpora as
# fuzz-out.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
c=.device-carry-fuzz
secs=${FUZZ_SECONDS:-540}
out=${OUT:-/tmp/fuzz-out}
mkdir -p "$out"
work=$(mktemp -d)
tar -C "$work" -xzf "$c/fuzz.tar.gz"
echo "== $(nproc) CPUs, $secs s per target, all targets at once"
pids=()
only=" ${FUZZ_ONLY:-$(ls "$work/bin" | tr '\n' ' ')} "
for bin in "$work"/bin/*; do
  t=$(basename "$bin")
  [[ $only == *" $t "* ]] || continue
  jobs_var="FUZZ_JOBS_$t"
  jobs=${!jobs_var:-$([ "$t" = zone_requests ] && echo 6 || echo 2)}
  mkdir -p "$work/new/$t" "$work/crashes/$t"
  # -fork: workers restart after a crash and the run goes on; -ignore_crashes keeps
  # counting. `timeout` is the hang guard around libFuzzer's own -max_total_time.
  timeout $((secs + 60)) "$bin" -fork="$jobs" -ignore_crashes=1 -max_total_time="$secs" \
    -artifact_prefix="$work/crashes/$t/" -rss_limit_mb=4096 -timeout=20 \
    "$work/new/$t" "$work/corpus/$t" > "$out/$t.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for bin in "$work"/bin/*; do
  t=$(basename "$bin")
  [[ $only == *" $t "* ]] || continue
  # fork mode's status lines: "#N: cov: C ft: F corp: K exec/s: E oom/timeout/crash: a/b/c time: Ts"
  last=$(grep -E '^#[0-9]+: cov:' "$out/$t.log" | tail -1)
  echo "$t: ${last:-no status line (see $t.log)}; new inputs: $(ls "$work/new/$t" | wc -l); crashes: $(ls "$work/crashes/$t" | wc -l)"
done
tar -C "$work" -czf "$out/fuzz-out.tar.gz" new crashes
rm -rf "$work"
