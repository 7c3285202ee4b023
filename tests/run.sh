#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs what it needs, then runs
# formatting and lint checks and every test (unit, protocol, real clients, crash, layout).
set -euo pipefail
cd "$(dirname "$0")/.."
tests/services/install.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# End-to-end tests start the release binaries; build them first.
cargo build --release --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
rm -rf target/leak-check
cargo test --workspace --release 2>&1 | tee "$log" || status=$?
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
# docker-compose.yml: images built here, the stack up, login/push/pull through its load balancer.
tests/compose.sh || status=1
# Nothing the tests produced may hold a password, secret, refresh token or JWT.
tests/secrets-check.sh "$log" || status=1
exit "$status"
