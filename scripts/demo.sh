#!/usr/bin/env bash
# Runs the mesh locally on its control plane: builds ztunnel, istiod-lite and
# the demo, makes sure the Kubernetes API server binaries exist, then starts
# an API server and istiod-lite and brings up two nodes with pods, a service
# VIP and an external host (network namespaces, as root). It walks through
# the Kubernetes objects and what istiod-lite pushes over xDS, a request over
# HBONE, ztunnel's view, its metrics, a live Service change, passthrough and
# packet captures, and keeps everything up until Ctrl-C.
#   scripts/demo.sh          # walk through, then wait for Ctrl-C
#   scripts/demo.sh --once   # walk through and tear down
# Everything it creates is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
for cmd in ip nft tcpdump; do
  if ! command -v "$cmd" >/dev/null 2>&1; then
    as_root scripts/install-deps.sh
    break
  fi
done
# The API server binaries are built once from Debian's source package and
# cached (minutes the first time; it installs build tools, hence root).
kube_bin=${KUBE_CACHE_DIR:-/var/cache/ambient-mesh/kube/v1.20.2/bin}
# sudo drops the environment; the binaries' location must survive it.
keep_env=()
[ -n "${KUBE_CACHE_DIR:-}" ] && keep_env+=("KUBE_CACHE_DIR=$KUBE_CACHE_DIR")
need_kube=0
for b in kube-apiserver kube-controller-manager kube-scheduler; do
  [ -x "$kube_bin/$b" ] || need_kube=1
done
for cmd in etcd kubectl openssl curl; do
  command -v "$cmd" >/dev/null 2>&1 || need_kube=1
done
if [ "$need_kube" = 1 ]; then
  echo "demo: building the Kubernetes control plane binaries (scripts/kube-build.sh)..." >&2
  as_root env "${keep_env[@]}" scripts/kube-build.sh
fi
target=${CARGO_TARGET_DIR:-target}
cargo build -p ztunnel -p istiod-lite -p e2e --bins
bin_dir=$(cd "$target/debug" && pwd)
run=("$bin_dir/mesh-demo" "$@")
if [ "$(id -u)" != 0 ]; then
  run=(sudo "MESH_BIN_DIR=$bin_dir" "${keep_env[@]}" "${run[@]}")
else
  export MESH_BIN_DIR=$bin_dir
fi
exec "${run[@]}"
