#!/usr/bin/env bash
# Runs the mesh locally: builds ztunnel and the demo, then brings up two nodes
# with pods, a service VIP and an external host (network namespaces, as
# root), walks through a request over HBONE, ztunnel's view, its metrics,
# passthrough and packet captures, and keeps everything up until Ctrl-C.
#   scripts/demo.sh          # walk through, then wait for Ctrl-C
#   scripts/demo.sh --once   # walk through and tear down
# Everything it creates is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
for cmd in ip nft tcpdump; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then scripts/install-deps.sh; else sudo scripts/install-deps.sh; fi
    break
  fi
done
target=${CARGO_TARGET_DIR:-target}
cargo build -p ztunnel -p e2e --bins
bin_dir=$(cd "$target/debug" && pwd)
run=("$bin_dir/mesh-demo" "$@")
if [ "$(id -u)" != 0 ]; then
  run=(sudo "MESH_BIN_DIR=$bin_dir" "${run[@]}")
else
  export MESH_BIN_DIR=$bin_dir
fi
exec "${run[@]}"
