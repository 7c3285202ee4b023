#!/usr/bin/env bash
# The suite-wide leak check, run by tests/run.sh after the tests: nothing the tests produced —
# the test output (with every server's stderr) and the audit events of every gateway they
# started (target/leak-check/logs) — may hold a password, a robot secret, a refresh token or a
# JWT. Random secrets are the ones tests noted in target/leak-check/ledger.txt; passwords are
# the test suites' (all end in -pw or are listed here); JWTs are recognised by their shape.
set -euo pipefail
cd "$(dirname "$0")/.."
log="$1"
dir=target/leak-check
ledger="$dir/ledger.txt"
if [ ! -s "$ledger" ]; then
  echo "leak check: no secrets were noted by the tests ($ledger): nothing to look for" >&2
  exit 1
fi
shopt -s nullglob
files=("$log" "$dir"/logs/*)
events=$(cat "$dir"/logs/* 2>/dev/null | wc -l)
patterns=$(mktemp)
trap 'rm -f "$patterns"' EXIT
awk 'length($0) >= 16' "$ledger" | sort -u > "$patterns"
found=0
if grep -F -n -f "$patterns" "${files[@]}" | cut -c1-300; then
  echo "leak check: a robot secret or refresh token appears above" >&2
  found=1
fi
# Passwords of the test users (htpasswd, LDAP, the OpenID provider) and the fixed secrets
# (the object stores' secret keys among them: moto's and Azurite's account key).
if grep -E -n -e '[A-Za-z0-9]-(ldap-|idp-)?pw\b' -e 'admin-password|reader-secret|ci-client-secret|deployment-internal-secret|portcullis-test-secret|Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50' "${files[@]}" | cut -c1-300; then
  echo "leak check: a password appears above" >&2
  found=1
fi
if grep -E -n 'eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.' "${files[@]}" | cut -c1-300; then
  echo "leak check: a JWT appears above" >&2
  found=1
fi
echo "leak check: $(wc -l < "$patterns") noted secrets, passwords and JWTs looked for in ${#files[@]} files ($events audit events): $([ $found = 0 ] && echo none found || echo FOUND)"
exit "$found"
