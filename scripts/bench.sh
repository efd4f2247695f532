#!/usr/bin/env bash
# Benchmarks, built in release mode.
#
#   scripts/bench.sh [mesh-bench args]      data path: the mesh against direct
#                                           pod-to-pod traffic on a local
#                                           two-node topology (needs root),
#                                           e.g. --json, --seconds 10 --dest vip
#   scripts/bench.sh --control-plane [args] control plane at scale: cp-bench
#                                           (10,000 pods / 1,000 services by
#                                           default; --pods, --services, --json)
#   scripts/bench.sh --policy               ztunnel's L4 authorization cost per
#                                           connection with 1, 100 and 1,000
#                                           policies in scope (no root needed)
# The data-path benchmark takes a bit over a minute, the control-plane one
# under a minute (plus the build).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
if [ "${1:-}" = "--policy" ]; then
  exec cargo bench -p ztunnel --bench rbac
fi
cargo build --release -p ztunnel -p istiod-lite -p e2e --bins
bin_dir=$(cd "$target/release" && pwd)
export MESH_BIN_DIR=$bin_dir
if [ "${1:-}" = "--control-plane" ]; then
  shift
  exec "$bin_dir/cp-bench" "$@"
fi
run=("$bin_dir/mesh-bench" "$@")
if [ "$(id -u)" != 0 ]; then
  run=(sudo --preserve-env=RUST_LOG "MESH_BIN_DIR=$bin_dir" "${run[@]}")
fi
exec "${run[@]}"
