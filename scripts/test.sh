#!/usr/bin/env bash
# The project's test command: format, lint, then every test. The
# network-namespace end-to-end tests need root (they create namespaces,
# veths, nftables rules); run as root to include them.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
# One test binary at a time keeps the 2-core machine from timing itself out;
# e2e tests also build their own topology per test.
cargo test --workspace --no-fail-fast -- --test-threads=2
