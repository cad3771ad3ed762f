#!/usr/bin/env bash
# Here (not on the GPU machine): builds the cargo-fuzz targets of both fuzz workspaces
# (nightly, optimised, with the address sanitizer unless FUZZ_SANITIZER=none: faster,
# and checking only what Rust itself checks), strips them, and packs them
# with their committed corpora into .device-carry-fuzz/fuzz.tar.gz for device/fuzz-long.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo +nightly fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
stage=$(mktemp -d)
mkdir -p "$stage/bin" "$stage/corpus"
for ws in idm-core/fuzz host-proxy/fuzz; do
  (cd "$ws" && cargo +nightly fuzz build -O -s "${FUZZ_SANITIZER:-address}")
  for t in $(cd "$ws" && cargo +nightly fuzz list); do
    strip -o "$stage/bin/$t" "$ws/target/x86_64-unknown-linux-gnu/release/$t"
    cp -r "$ws/corpus/$t" "$stage/corpus/$t"
  done
done
mkdir -p .device-carry-fuzz
tar -C "$stage" -czf .device-carry-fuzz/fuzz.tar.gz bin corpus
rm -rf "$stage"
ls -la .device-carry-fuzz/fuzz.tar.gz
