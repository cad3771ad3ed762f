#!/usr/bin/env bash
# On the build machine: bundles this machine's `perf` with every library it loads (its own
# glibc and loader included) into .device-carry-perf/, for GPU machines without perf. Run it
# there as .device-carry-perf/run-perf ARGS: the bundled loader runs perf on the bundled
# libraries only, so programs perf starts (host-proxy) still load the machine's own.
# libvgpu-profile.sh picks it up when the directory is carried.
set -euo pipefail
cd "$(dirname "$0")/.."
perf=$(readlink -f "$(command -v perf)") || { echo "FAIL: perf is not installed here (apt-get install linux-perf)" >&2; exit 1; }
dir=.device-carry-perf
rm -rf "$dir"
mkdir -p "$dir/lib"
cp "$perf" "$dir/perf"
loader=""
while read -r name arrow path _; do
    case "$name" in
    /*) loader=$name ;;
    *) if [ "$arrow" = "=>" ] && [ -f "$path" ]; then cp -L "$path" "$dir/lib/"; fi ;;
    esac
done < <(ldd "$perf")
[ -n "$loader" ] || { echo "FAIL: no loader in ldd's output for $perf" >&2; exit 1; }
cp -L "$loader" "$dir/ld.so"
cat >"$dir/run-perf" <<'RUN'
#!/usr/bin/env bash
d=$(cd "$(dirname "$0")" && pwd)
exec "$d/ld.so" --library-path "$d/lib" "$d/perf" "$@"
RUN
chmod +x "$dir/run-perf" "$dir/ld.so"
du -sh "$dir"
