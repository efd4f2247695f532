#!/usr/bin/env bash
# Starts a throw-away Kubernetes v1.20 control plane on loopback for integration
# tests: etcd, kube-apiserver, kube-controller-manager and kube-scheduler, built
# by scripts/kube-build.sh. No kubelet: pods are scheduled but never run.
#
#   scripts/kube-up.sh DIR          start; writes DIR/kubeconfig and prints
#                                   `export KUBECONFIG=DIR/kubeconfig` on stdout
#   scripts/kube-up.sh --down DIR   stop what DIR's pid files name, remove DIR
#
# Environment:
#   KUBE_CACHE_DIR        binaries (default /var/cache/ambient-mesh/kube/v1.20.2/bin)
#   KUBE_ETCD_PORT        etcd client port     (default: a free random port)
#   KUBE_ETCD_PEER_PORT   etcd peer port       (default: a free random port)
#   KUBE_APISERVER_PORT   apiserver HTTPS port (default: a free random port)
#   KUBE_READY_TIMEOUT    seconds to wait for /readyz (default 60)
# Everything listens on 127.0.0.1 only; the controller manager and scheduler
# serve no ports at all.
set -euo pipefail

CACHE_DIR="${KUBE_CACHE_DIR:-/var/cache/ambient-mesh/kube/v1.20.2/bin}"
log() { echo "[kube-up] $*" >&2; }
die() { echo "kube-up: $*" >&2; exit 1; }

stop_all() { # dir
  local dir=$1 f pid name
  [ -d "$dir/pids" ] || return 0
  # reverse start order so the apiserver never outlives etcd for long
  for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
    f="$dir/pids/$name.pid"
    [ -f "$f" ] || continue
    pid="$(cat "$f")"
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

if [ "${1:-}" = "--down" ]; then
  [ -n "${2:-}" ] || die "usage: $0 --down DIR"
  stop_all "$2"
  rm -rf "$2"
  log "stopped and removed $2"
  exit 0
fi
[ -n "${1:-}" ] || die "usage: $0 DIR | $0 --down DIR"

for b in kube-apiserver kube-controller-manager kube-scheduler; do
  [ -x "$CACHE_DIR/$b" ] || die "$CACHE_DIR/$b missing; run scripts/kube-build.sh"
done
for c in etcd openssl curl; do command -v "$c" >/dev/null || die "$c not installed; run scripts/kube-build.sh"; done

mkdir -p "$1"
DIR="$(cd "$1" && pwd)"
[ -e "$DIR/pids" ] && die "$DIR already holds a control plane; use --down first"
mkdir -p "$DIR/pids" "$DIR/pki" "$DIR/logs"
trap 'rc=$?; if [ $rc -ne 0 ]; then log "failed; logs in $DIR/logs"; stop_all "$DIR"; fi' EXIT

used_ports=""
# Ports below the kernel's ephemeral range: one inside it can be taken by any
# outgoing connection between choosing it and the server binding it.
ephemeral_lo=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
[ "$ephemeral_lo" -gt 21000 ] || ephemeral_lo=32768
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % (ephemeral_lo - 20000) ))
    case " $used_ports " in *" $p "*) continue ;; esac
    if [ -z "$(ss -Hatn "sport = :$p" 2>/dev/null)" ]; then used_ports="$used_ports $p"; echo "$p"; return; fi
  done
  die "no free port found"
}
ETCD_PORT="${KUBE_ETCD_PORT:-$(free_port)}"; used_ports="$used_ports $ETCD_PORT"
ETCD_PEER_PORT="${KUBE_ETCD_PEER_PORT:-$(free_port)}"; used_ports="$used_ports $ETCD_PEER_PORT"
API_PORT="${KUBE_APISERVER_PORT:-$(free_port)}"

# --- PKI: a CA, the apiserver serving cert, the service-account key pair ----
P="$DIR/pki"
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=kube-ca" \
  -keyout "$P/ca.key" -out "$P/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
  -keyout "$P/apiserver.key" -out "$P/apiserver.csr" 2>/dev/null
cat >"$P/apiserver.ext" <<EXT
basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EXT
openssl x509 -req -in "$P/apiserver.csr" -CA "$P/ca.crt" -CAkey "$P/ca.key" -CAcreateserial \
  -days 3650 -extfile "$P/apiserver.ext" -out "$P/apiserver.crt" 2>/dev/null
openssl genrsa -out "$P/sa.key" 2048 2>/dev/null
openssl rsa -in "$P/sa.key" -pubout -out "$P/sa.pub" 2>/dev/null
chmod 600 "$P"/*.key

# --- static tokens: admin (system:masters) and one per control-plane client --
tok() { openssl rand -hex 16; }
ADMIN_TOKEN="$(tok)"; KCM_TOKEN="$(tok)"; SCHED_TOKEN="$(tok)"
cat >"$P/tokens.csv" <<TOK
$ADMIN_TOKEN,admin,admin,"system:masters"
$KCM_TOKEN,system:kube-controller-manager,kcm
$SCHED_TOKEN,system:kube-scheduler,sched
TOK
chmod 600 "$P/tokens.csv"

SERVER="https://127.0.0.1:$API_PORT"
kubeconfig() { # file user token
  cat >"$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: $SERVER
    certificate-authority-data: $(base64 -w0 <"$P/ca.crt")
users:
- name: $2
  user:
    token: $3
contexts:
- name: local
  context:
    cluster: local
    user: $2
current-context: local
KC
  chmod 600 "$1"
}
kubeconfig "$DIR/kubeconfig" admin "$ADMIN_TOKEN"
kubeconfig "$DIR/kcm.kubeconfig" system:kube-controller-manager "$KCM_TOKEN"
kubeconfig "$DIR/scheduler.kubeconfig" system:kube-scheduler "$SCHED_TOKEN"

start() { # name cmd...
  local name=$1; shift
  setsid "$@" >"$DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/pids/$name.pid"
}
alive() { kill -0 "$(cat "$DIR/pids/$1.pid")" 2>/dev/null || { tail -20 "$DIR/logs/$1.log" >&2; die "$1 exited"; }; }

# --- etcd --------------------------------------------------------------------
start etcd etcd --name kube --data-dir "$DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "kube=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state new \
  --log-level warn
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && break
  alive etcd; sleep 0.1
done
curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null || die "etcd not healthy"

# --- kube-apiserver ----------------------------------------------------------
start kube-apiserver "$CACHE_DIR/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" --insecure-port 0 \
  --endpoint-reconciler-type none \
  --tls-cert-file "$P/apiserver.crt" --tls-private-key-file "$P/apiserver.key" \
  --client-ca-file "$P/ca.crt" --token-auth-file "$P/tokens.csv" \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$P/sa.pub" --service-account-signing-key-file "$P/sa.key" \
  --service-cluster-ip-range 10.96.0.0/16 --allow-privileged=true \
  --authorization-mode Node,RBAC \
  --profiling=false --cert-dir "$DIR/apiserver-certs"

ready() { curl -sf --cacert "$P/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" "$SERVER/readyz" >/dev/null 2>&1; }
deadline=$(( $(date +%s) + ${KUBE_READY_TIMEOUT:-60} ))
until ready; do
  alive kube-apiserver
  [ "$(date +%s)" -lt "$deadline" ] || die "apiserver not ready after ${KUBE_READY_TIMEOUT:-60}s"
  sleep 0.25
done

# --- kube-controller-manager and kube-scheduler ------------------------------
start kube-controller-manager "$CACHE_DIR/kube-controller-manager" \
  --kubeconfig "$DIR/kcm.kubeconfig" \
  --service-account-private-key-file "$P/sa.key" --root-ca-file "$P/ca.crt" \
  --use-service-account-credentials \
  --cluster-signing-cert-file "$P/ca.crt" --cluster-signing-key-file "$P/ca.key" \
  --service-cluster-ip-range 10.96.0.0/16 \
  --leader-elect=false --port 0 --secure-port 0 --bind-address 127.0.0.1
start kube-scheduler "$CACHE_DIR/kube-scheduler" \
  --kubeconfig "$DIR/scheduler.kubeconfig" \
  --leader-elect=false --port 0 --secure-port 0 --bind-address 127.0.0.1

# The default ServiceAccount is what pods need; wait for it so callers can
# create pods straight away.
for _ in $(seq 1 120); do
  curl -sf --cacert "$P/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
    "$SERVER/api/v1/namespaces/default/serviceaccounts/default" >/dev/null 2>&1 && break
  alive kube-controller-manager; sleep 0.25
done
alive kube-controller-manager
alive kube-scheduler
trap - EXIT
log "control plane up at $SERVER (logs in $DIR/logs)"
echo "export KUBECONFIG=$DIR/kubeconfig"
