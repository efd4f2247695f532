#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and kube-scheduler v1.20.2 from
# Debian bookworm's `kubernetes` source package and caches the binaries, so that
# integration tests can run against a real control plane (see scripts/kube-up.sh).
#
# Idempotent: when all binaries are already in the cache it does nothing.
#
# Environment:
#   KUBE_CACHE_DIR  where the binaries go (default /var/cache/ambient-mesh/kube/v1.20.2/bin)
#   KUBE_WORK_DIR   scratch dir for the source tree (default: <cache>/../src)
#   KUBE_SRC_VERSION  Debian source version (default 1.20.5+really1.20.2-1.1+deb12u1)
set -euo pipefail

KUBE_VERSION=v1.20.2
SRC_VERSION="${KUBE_SRC_VERSION:-1.20.5+really1.20.2-1.1+deb12u1}"
CACHE_DIR="${KUBE_CACHE_DIR:-/var/cache/ambient-mesh/kube/${KUBE_VERSION}/bin}"
WORK_DIR="${KUBE_WORK_DIR:-$(dirname "$CACHE_DIR")/src}"
BINS=(kube-apiserver kube-controller-manager kube-scheduler)

t0=$(date +%s)
log() { echo "[kube-build +$(( $(date +%s) - t0 ))s] $*" >&2; }

have_all() {
  local b
  for b in "${BINS[@]}"; do [ -x "$CACHE_DIR/$b" ] || return 1; done
}

# Runtime tools are needed even when the binaries are cached.
need_pkgs=()
command -v etcd >/dev/null 2>&1 || need_pkgs+=(etcd-server)
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
if ! command -v kubectl >/dev/null 2>&1 && apt-cache show kubernetes-client >/dev/null 2>&1; then
  need_pkgs+=(kubernetes-client)
fi
if ! have_all; then
  command -v go >/dev/null 2>&1 || need_pkgs+=(golang-go)
  command -v rsync >/dev/null 2>&1 || need_pkgs+=(rsync)
  command -v dpkg-source >/dev/null 2>&1 || need_pkgs+=(dpkg-dev)
  [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need_pkgs+=(golang-github-modern-go-reflect2-dev)
  command -v make >/dev/null 2>&1 || need_pkgs+=(make)
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "apt-get install ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${need_pkgs[@]}" >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need_pkgs[@]}" >/dev/null; }
fi
# The Debian etcd-server package starts a system etcd on 2379; the control
# plane brings its own on other ports, so the system one is left alone.

if have_all; then
  log "binaries already in $CACHE_DIR; nothing to build"
  exit 0
fi

mkdir -p "$WORK_DIR" "$CACHE_DIR"
WORK_DIR="$(cd "$WORK_DIR" && pwd)"

# --- fetch the source package through a private apt configuration ----------
# deb-src lines mirror the machine's own Debian sources (same URIs, suites and
# keyrings) so the system apt configuration is never touched.
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"
APT_DIR="$WORK_DIR/apt"
mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial" "$APT_DIR/parts"
src_list="$APT_DIR/sources.list"
: >"$src_list"

emit() { # uri suites components signed_by
  local uri=$1 suites=$2 comps=$3 key=$4 s opt=""
  [ -n "$key" ] && opt="[signed-by=$key] "
  for s in $suites; do
    case "$s" in "$codename"|"$codename"-*) ;; *) continue ;; esac
    echo "deb-src ${opt}$uri $s $comps" >>"$src_list"
  done
}

# deb822 .sources files: paragraphs of Key: value lines.
for f in /etc/apt/sources.list.d/*.sources; do
  [ -e "$f" ] || continue
  uris="" suites="" comps="" key="" enabled=yes
  flush() {
    if [ -n "$uris" ] && [ "$enabled" != no ]; then
      for u in $uris; do emit "$u" "$suites" "$comps" "$key"; done
    fi
    uris="" suites="" comps="" key="" enabled=yes
  }
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
      \#*) continue ;;
      "") flush; continue ;;
    esac
    k="${line%%:*}"; v="${line#*:}"; v="$(echo "$v" | xargs)"
    case "${k,,}" in
      uris) uris="$v" ;; suites) suites="$v" ;; components) comps="$v" ;;
      signed-by) key="$v" ;; enabled) enabled="${v,,}" ;;
    esac
  done <"$f"
  flush
done
# one-line format
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -e "$f" ] || continue
  while read -r typ rest; do
    [ "$typ" = deb ] || continue
    key=""
    if [[ "$rest" == \[* ]]; then
      opts="${rest%%]*}"; rest="${rest#*] }"
      [[ "$opts" =~ signed-by=([^ \]]+) ]] && key="${BASH_REMATCH[1]}"
    fi
    read -r uri suite comps <<<"$rest"
    emit "$uri" "$suite" "$comps" "$key"
  done <"$f"
done
sort -u -o "$src_list" "$src_list"
[ -s "$src_list" ] || { echo "kube-build: no Debian $codename source found in /etc/apt" >&2; exit 1; }
log "private deb-src list: $(tr '\n' ';' <"$src_list")"

APT_OPTS=(-o "Dir::Etc::SourceList=$src_list" -o "Dir::Etc::SourceParts=$APT_DIR/parts"
          -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::Cache=$APT_DIR/cache")

SRC_TREE="$WORK_DIR/kubernetes-${SRC_VERSION%%-*}"
if [ ! -f "$SRC_TREE/.unpacked" ]; then
  dl="$WORK_DIR/dl"
  mkdir -p "$dl"
  if ! ls "$dl"/kubernetes_*.dsc >/dev/null 2>&1; then
    log "apt-get update (private lists)"
    apt-get "${APT_OPTS[@]}" update >/dev/null
    log "apt-get source --download-only kubernetes=$SRC_VERSION"
    (cd "$dl" && apt-get "${APT_OPTS[@]}" source --download-only "kubernetes=$SRC_VERSION" >/dev/null)
  fi
  rm -rf "$SRC_TREE"
  log "unpacking"
  (cd "$dl" && dpkg-source --no-check -x kubernetes_*.dsc "$SRC_TREE" >/dev/null)
  touch "$SRC_TREE/.unpacked"
fi
log "source tree: $SRC_TREE"

# --- required fix: reflect2 v1.0.1 faults under Go >= 1.18 ------------------
R2=/usr/share/gocode/src/github.com/modern-go/reflect2
VR2="$SRC_TREE/vendor/github.com/modern-go/reflect2"
if [ ! -f "$VR2/.from-debian" ]; then
  log "replacing vendored reflect2 with $R2"
  rm -rf "$VR2"
  mkdir -p "$VR2"
  cp -a "$R2"/. "$VR2"/
  rm -f "$VR2"/go.mod "$VR2"/go.sum
  # vendor/modules.txt pins v1.0.1; the API is unchanged so the pin may stay,
  # but record the version actually used.
  sed -i 's|^# github.com/modern-go/reflect2 v1.0.1$|# github.com/modern-go/reflect2 v1.0.2|' "$SRC_TREE/vendor/modules.txt" || true
  sed -i 's|github.com/modern-go/reflect2 v1.0.1$|github.com/modern-go/reflect2 v1.0.2|' "$SRC_TREE/go.mod" || true
  touch "$VR2/.from-debian"
fi

# --- build ------------------------------------------------------------------
export KUBE_GIT_VERSION="$KUBE_VERSION" KUBE_GIT_TREE_STATE=clean CGO_ENABLED=0
export GOCACHE="${GOCACHE:-$WORK_DIR/gocache}" GOFLAGS="${GOFLAGS:-}" GOTOOLCHAIN=local
tb=$(date +%s)
what=""
for b in "${BINS[@]}"; do what="$what cmd/$b"; done
log "make WHAT=\"${what# }\" (go $(go env GOVERSION))"
make -C "$SRC_TREE" WHAT="${what# }" CGO_ENABLED=0 KUBE_VERBOSE=1 >"$WORK_DIR/build.log" 2>&1 \
  || { tail -40 "$WORK_DIR/build.log" >&2; echo "kube-build: make failed, see $WORK_DIR/build.log" >&2; exit 1; }
log "make took $(( $(date +%s) - tb ))s"

for b in "${BINS[@]}"; do
  out="$(find "$SRC_TREE/_output" -type f -name "$b" -perm -u+x | head -1)"
  [ -n "$out" ] || { echo "kube-build: $b not produced" >&2; exit 1; }
  install -m 0755 "$out" "$CACHE_DIR/$b.tmp"
  mv -f "$CACHE_DIR/$b.tmp" "$CACHE_DIR/$b"
done
"$CACHE_DIR/kube-apiserver" --version >&2
log "done: ${BINS[*]} in $CACHE_DIR (total $(( $(date +%s) - t0 ))s)"
