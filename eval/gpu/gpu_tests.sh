#!/usr/bin/env bash
# The GPU test groups, each test in its own process, at most JOBS at once (they are mostly
# Triton compiling on the CPU): the kernels' and the export pipeline's GPU tests by default.
#   bash eval/gpu/gpu_tests.sh LOG [JOBS] [TIMEOUT]   (after eval/gpu/setup.sh has been sourced)
# TESTS_PATHS=... picks the files, TESTS_K=... narrows them (pytest -k). LOG gets each test's
# outcome, the failures' tails and "kernel tests: P of N passed" (LOG.partial: each outcome as it ends,
# for a call cut short).
set -u
LOG=$1; JOBS=${2:-16}; TIMEOUT=${3:-300}
T=$(mktemp -d /tmp/ktests.XXXX)
# their own Triton cache: tunings made while the tests share the machine are not kept for later timings
export TRITON_CACHE_DIR=$T/triton_cache
python3 -m pytest ${TESTS_PATHS:-tests/kernels tests/test_export_reader.py} -k "${TESTS_K:-gpu}" --collect-only -q \
  -p no:cacheprovider | grep '::' > "$T/ids"
one() {  # one test, its log named after it; its outcome also goes to LOG.partial as it ends
  f=$T/$(echo "$1" | tr -c 'A-Za-z0-9_\n' _).log
  timeout "$TIMEOUT" python3 -m pytest "$1" -q -p no:cacheprovider -rA --durations=3 > "$f" 2>&1
  echo "exit $? $1" >> "$f"
  grep -E "^(PASSED|FAILED|ERROR|exit)" "$f" >> "$LOG.partial"
}
export -f one; export T TIMEOUT LOG
rm -f "$LOG.partial"
xargs -P "$JOBS" -I{} bash -c 'one "$@"' _ {} < "$T/ids"
for f in "$T"/*.log; do grep -E "^(PASSED|FAILED|ERROR|exit)|s call" "$f"; done > "$LOG"
grep -h -B40 -E "^FAILED|^ERROR" "$T"/*.log >> "$LOG"
echo "kernel tests: $(grep -c '^exit 0' "$LOG") of $(grep -c '^exit' "$LOG") passed" >> "$LOG"
