#!/usr/bin/env bash
# Here, before a device run: copies NVIDIA's cuda-samples subset (default /work/shared/cuda-samples,
# or the tree given as $1) to .device-carry-samples/cuda-samples in this checkout, where
# device/cuda-samples.sh looks for it. git ignores that folder (/.device-carry* in .gitignore), so
# the device tool sends it only when the call names it: carry [".device-carry", ".device-carry-samples"].
# Build folders and editor settings are left out; the copy must stay below 20 MB (the whole tree
# that travels, carried folders included, must stay below 64 MiB).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
src=${1:-/work/shared/cuda-samples}
dst=.device-carry-samples/cuda-samples
limit_kb=$((20 * 1024))

if [ ! -f "$src/CMakeLists.txt" ] || [ ! -d "$src/Common" ] || [ ! -d "$src/Samples" ]; then
    echo "FAIL: $src is not a cuda-samples tree (CMakeLists.txt, Common/, Samples/)" >&2
    exit 1
fi
if ! git check-ignore -q "$dst/CMakeLists.txt"; then
    echo "FAIL: git does not ignore $dst: add /.device-carry-samples to .gitignore" >&2
    exit 1
fi

rm -rf "$dst"
mkdir -p "$dst" || exit 1
# Build outputs of an earlier build in the source tree would travel and confuse CMake's cache.
excludes=(build 'build-*' 'cmake-build-*' CMakeFiles CMakeCache.txt .vscode)
if command -v rsync >/dev/null 2>&1; then
    rsync -a "${excludes[@]/#/--exclude=}" "$src/" "$dst/" || exit 1
else
    cp -a "$src/." "$dst/" || exit 1
    for x in "${excludes[@]}"; do
        find "$dst" -depth -name "$x" -exec rm -rf {} + || exit 1
    done
fi

[ -f "$dst/LICENSE" ] || echo "WARN: $src has no LICENSE: NVIDIA's licence must travel with the samples" >&2
kb=$(du -sk "$dst" | cut -f1)
n=$(find "$dst/Samples" -mindepth 3 -maxdepth 3 -name CMakeLists.txt | wc -l)
echo "== staged $n samples from $src in $dst: $((kb / 1024)) MB ($kb KB)"
if [ "$kb" -ge "$limit_kb" ]; then
    echo "FAIL: $dst is $kb KB, over the 20 MB limit" >&2
    exit 1
fi
if [ -d .device-carry ]; then
    echo "== .device-carry is $(du -sk .device-carry | cut -f1) KB (the tree that travels must stay below 64 MiB)"
else
    echo "== no .device-carry yet: cargo xtask device-build makes it (without it the samples run natively only)"
fi
