#!/usr/bin/env bash
# The project's test command: format, lint, then every test. The
# network-namespace end-to-end tests need root (they create namespaces,
# veths, nftables rules); run as root to include them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The e2e tests start these binaries inside network namespaces.
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Two test threads: each e2e test builds its own topology, and the machine
# may have only two cores.
status=0
cargo test --workspace --all-targets --no-fail-fast -- --test-threads=2 2>&1 | tee "$log" || status=$?
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i; if ($(i+1) ~ /^ignored;?$/) s += $i } }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
