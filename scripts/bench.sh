#!/usr/bin/env bash
# Benchmark of the mesh data path against direct pod-to-pod traffic: builds
# release binaries, then runs `mesh-bench` as root on a local two-node
# topology (network namespaces). Arguments go to mesh-bench, e.g.
#   scripts/bench.sh --json
#   scripts/bench.sh --seconds 10 --dest vip
# The benchmark itself takes a bit over a minute (plus the build).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release -p ztunnel -p e2e --bins
bin_dir=$(cd "$target/release" && pwd)
run=("$bin_dir/mesh-bench" "$@")
if [ "$(id -u)" != 0 ]; then
  run=(sudo --preserve-env=RUST_LOG "MESH_BIN_DIR=$bin_dir" "${run[@]}")
else
  export MESH_BIN_DIR=$bin_dir
fi
exec "${run[@]}"
