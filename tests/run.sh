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
# Its images need room: on a machine short of disk, what the tests no longer need goes first
# (lint artefacts, test binaries; the release binaries the images take stay).
avail_gib() { df -BG --output=avail target | tail -1 | tr -dc 0-9; }
echo "disk: $(avail_gib) GiB free before the compose check"
if [ "$(avail_gib)" -lt 16 ]; then
  rm -rf target/debug target/release/deps target/release/incremental
  echo "disk: $(avail_gib) GiB free after removing target/debug and target/release/deps"
fi
tests/compose.sh || status=1
# Nothing the tests produced may hold a password, secret, refresh token or JWT.
tests/secrets-check.sh "$log" || status=1
exit "$status"
