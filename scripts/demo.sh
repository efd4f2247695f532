#!/usr/bin/env bash
# The main job: brings up the local mesh (a real Kubernetes control plane,
# two nodes as network namespaces, istiod-lite, and ztunnel, the node agent,
# the CNI chain and a kubelet on every node), installs Istio's Bookinfo and
# curl samples, enrolls the namespace in ambient mode and walks through a
# request from curl to productpage that crosses nodes over HBONE. The mesh
# stays up afterwards for you to explore with kubectl and ambientctl.
#   scripts/demo.sh               # up + walk through; leaves the mesh running
#   scripts/demo.sh --down        # ... then stop it and remove everything
#   scripts/demo.sh --walkthrough # the older, lower-level tour (mesh-demo)
# Root is needed (network namespaces, nftables); sudo is used if you are not.
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
# System packages and the API server binaries (built once, then cached).
as_root scripts/install-deps.sh
target=${CARGO_TARGET_DIR:-target}
cargo build --workspace --bins
bin_dir=$(cd "$target/debug" && pwd)
if [ "${1:-}" = "--walkthrough" ]; then
  shift
  as_root env MESH_BIN_DIR="$bin_dir" "$bin_dir/mesh-demo" "$@"
  exit
fi
actl() { as_root "$bin_dir/ambientctl" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "ambientctl local up"
actl local up
state=${AMBIENT_LOCAL_DIR:-/var/run/ambient-mesh/local}
export KUBECONFIG=$state/kube/kubeconfig
k() { as_root kubectl --kubeconfig "$KUBECONFIG" "$@"; }

step "kubectl get nodes"
k get nodes -o wide

step "Install Bookinfo and curl (Istio's samples, unchanged)"
k apply -f samples/bookinfo/bookinfo.yaml
k apply -f samples/curl/curl.yaml
k wait --for=condition=Available deployments --all -n default --timeout=180s
k wait --for=condition=Ready pods --all -n default --timeout=180s
k get pods -o wide

step "Enroll the namespace: kubectl label namespace default istio.io/dataplane-mode=ambient"
k label namespace default istio.io/dataplane-mode=ambient --overwrite
# The node agents capture the running pods in place; no restart.
for _ in $(seq 1 60); do
  left=$(k get pods -n default -o jsonpath='{range .items[*]}{.metadata.annotations.ambient\.istio\.io/redirection}{"\n"}{end}' | grep -vc '^enabled$' || true)
  [ "$left" = 0 ] && break
  sleep 1
done
k get pods -n default -o custom-columns='POD:.metadata.name,NODE:.spec.nodeName,IP:.status.podIP,REDIRECTION:.metadata.annotations.ambient\.istio\.io/redirection'

curl_pod=$(k get pods -l app=curl -o jsonpath='{.items[0].metadata.name}')
step "ambientctl local exec $curl_pod -- curl -s http://productpage:9080/productpage"
page=$(actl local exec "$curl_pod" -- curl -sS --max-time 10 http://productpage:9080/productpage)
echo "$page" | grep -o '<title>.*</title>'
echo "Reviews served by: $(echo "$page" | grep -A1 'Reviews served by' | grep -o '<u>[^<]*</u>' | head -1 | sed 's/<[^>]*>//g')"

step "What ztunnel saw: TCP connections with mutual TLS (HBONE)"
for node in node1 node2; do
  ns=$(cat "$state/nodes/$node/netns")
  as_root ip netns exec "$ns" curl -s http://127.0.0.1:15020/metrics \
    | grep '^istio_tcp_connections_opened_total' | grep 'mutual_tls' \
    | sed -E 's/.*source_workload="([^"]*)".*destination_workload="([^"]*)".*connection_security_policy="([^"]*)".*\} ([0-9]+)/'"$node"': \1 -> \2 (\3): \4/' | sort -u || true
done

reviews_for() { # user ("" for anonymous) -> which reviews version served the page
  actl local exec "$curl_pod" -- sh -c "jar=\$(mktemp); [ -n '$1' ] && curl -s -o /dev/null -c \$jar -d 'username=$1&passwd=' http://productpage:9080/login; curl -s -b \$jar http://productpage:9080/productpage | grep -o 'reviews-v[123]' | head -1; rm -f \$jar"
}

step "L7: ambientctl waypoint apply --enroll-namespace --wait"
actl waypoint apply -n default --enroll-namespace --wait
k get gateway waypoint -n default
k wait --for=condition=Available deployment/waypoint -n default --timeout=180s

step "Request routing (Istio's task files): jason sees reviews v2, everyone else v1"
k apply -f samples/bookinfo/networking/destination-rule-all.yaml
k apply -f samples/bookinfo/networking/virtual-service-all-v1.yaml
k apply -f samples/bookinfo/networking/virtual-service-reviews-test-v2.yaml
for _ in $(seq 1 60); do
  [ "$(reviews_for jason)" = reviews-v2 ] && break
  sleep 1
done
for user in "" jason; do
  echo "${user:-anonymous}: $(for _ in 1 2 3 4 5; do reviews_for "$user"; done | sort | uniq -c | tr -s ' ' | tr '\n' ' ')"
done

step "What the waypoint saw: istio_requests_total{reporter=\"waypoint\"}"
wp_pod=$(k get pods -n default -l gateway.networking.k8s.io/gateway-name=waypoint -o jsonpath='{.items[0].metadata.name}')
actl local exec "$wp_pod" -- curl -s http://127.0.0.1:15020/metrics \
  | grep '^istio_requests_total' \
  | sed -E 's/.*destination_workload="([^"]*)".*response_code="([^"]*)".*\} ([0-9]+)/\1 \2: \3/' | sort || true

if [ "${1:-}" = "--down" ]; then
  step "ambientctl local down"
  actl local down
  exit 0
fi
cat <<EOT

The local mesh keeps running. Try:
  export KUBECONFIG=$KUBECONFIG
  kubectl get pods -o wide
  sudo $bin_dir/ambientctl local exec $curl_pod -- curl -s http://reviews:9080/reviews/0
  sudo $bin_dir/ambientctl local status
Stop it and remove everything:
  sudo $bin_dir/ambientctl local down
EOT
