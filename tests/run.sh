#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs what it needs, then runs
# formatting and lint checks and every test (unit, protocol, real clients, crash, layout).
set -euo pipefail
cd "$(dirname "$0")/.."
tests/services/install.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --release
