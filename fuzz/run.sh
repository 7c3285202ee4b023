#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each (default 600), one after the other,
# on the corpus kept in fuzz/corpus/<target> (seeded from fuzz/seeds/<target>), and prints
# each run's executions and coverage. A crash stops the run and leaves the input in
# fuzz/artifacts/<target>/: fix it, and add the input as a regression test.
#
#   fuzz/run.sh [SECONDS] [TARGET…]
#
# One fuzzing process at a time; to use more cores, start the script once per core with
# different targets.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). libFuzzer's instrumentation uses rustc flags
# that only nightly accepts; this machine has stable only, so RUSTC_BOOTSTRAP=1 lets stable
# take them, and `--sanitizer none` (no AddressSanitizer: the code has no `unsafe`, so what
# is looked for is panics, overflows (`--debug-assertions`), hangs and broken properties).
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
export RUSTC_BOOTSTRAP=1
summary=()
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  log=$(mktemp)
  echo "== $t: ${seconds}s"
  status=0
  cargo fuzz run --release --sanitizer none --debug-assertions "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -max_len=65536 -timeout=10 -print_final_stats=1 \
    >"$log" 2>&1 || status=$?
  grep -E "^#[0-9]+.*DONE|panicked|deadly signal|ERROR" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log"
    echo "$t: FOUND A CRASH (exit $status; the input is in fuzz/artifacts/$t/)"
    exit 1
  fi
  execs=$(grep -oE "stat::number_of_executed_units: *[0-9]+" "$log" | grep -oE "[0-9]+$" || echo "?")
  cov=$(grep -E "^#[0-9]+[[:space:]]+DONE" "$log" | tail -n 1 | grep -oE "cov: [0-9]+ ft: [0-9]+" || echo "?")
  summary+=("$t: $execs executions in ${seconds}s, $cov, corpus $(ls "corpus/$t" | wc -l) inputs")
  rm -f "$log"
done
printf '%s\n' "${summary[@]}"
