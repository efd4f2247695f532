#!/usr/bin/env bash
# Installs the system packages the tests and the local mesh need (Debian).
# Idempotent: does nothing when everything is present.
set -euo pipefail
need=()
for pair in ip:iproute2 nft:nftables iptables:iptables tcpdump:tcpdump curl:curl ping:iputils-ping; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${need[*]} (run as root to install them)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi
# rustfmt and clippy come with the toolchain; add them only where missing.
for c in rustfmt clippy; do
  if ! cargo "${c/rustfmt/fmt}" --version >/dev/null 2>&1; then
    rustup component add "$c" || echo "warning: could not add $c" >&2
  fi
done
# The control-plane tests run against a real kube-apiserver built from
# Debian's source package; cached after the first build (~7 minutes cold).
"$(dirname "$0")/kube-build.sh"
