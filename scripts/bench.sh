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
#   scripts/bench.sh --waypoint [args]      HTTP through a waypoint vs ztunnel
#                                           only vs direct on the local mesh:
#                                           requests/s, latency at a fixed
#                                           rate, the waypoint's CPU and memory
#                                           (needs root; --json, --seconds N)
# The data-path benchmark takes a bit over a minute, the control-plane one
# under a minute, the waypoint one about three minutes (plus the build).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
if [ "${1:-}" = "--policy" ]; then
  exec cargo bench -p ztunnel --bench rbac
fi
if [ "${1:-}" = "--waypoint" ]; then
  # The local mesh runs every component: the node agent with the CNI
  # plugin, ztunnel, istiod-lite, provisioned waypoints, and ambientctl to
  # enroll one.
  cargo build --release -p ztunnel -p istiod-lite -p waypoint -p node-agent \
    -p cni-plugin -p ambientctl -p e2e --bins
else
  cargo build --release -p ztunnel -p istiod-lite -p e2e --bins
fi
bin_dir=$(cd "$target/release" && pwd)
export MESH_BIN_DIR=$bin_dir
if [ "${1:-}" = "--control-plane" ]; then
  shift
  exec "$bin_dir/cp-bench" "$@"
fi
if [ "${1:-}" = "--waypoint" ]; then
  shift
  run=("$bin_dir/waypoint-bench" "$@")
else
  run=("$bin_dir/mesh-bench" "$@")
fi
if [ "$(id -u)" != 0 ]; then
  run=(sudo --preserve-env=RUST_LOG "MESH_BIN_DIR=$bin_dir" "${run[@]}")
fi
exec "${run[@]}"
