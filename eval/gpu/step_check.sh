#!/usr/bin/env bash
# After a change to the VQ-EMA training step's kernels (code statistics, EMA update, commitment): their
# GPU test groups, then the step timings beside the search and vector-quantize-pytorch, in one short call.
#   device run, carry [.whl]:  bash eval/gpu/step_check.sh      (about 3 minutes on an H100)
# TEST_GROUPS=... picks the test groups of tests/kernels/test_nearest.py; results land in $OUT/step_check.
set -u
source eval/gpu/setup.sh
OUT=${OUT:-results_tmp}/step_check; mkdir -p "$OUT"
TEST_GROUPS=${TEST_GROUPS:-check_code_statistics check_ema_update check_fused_training_step}
ids=""; for g in $TEST_GROUPS; do ids="$ids tests/kernels/test_nearest.py::test_gpu[$g]"; done
timeout "${TESTS_TIMEOUT:-200}" python3 -m pytest -q -p no:cacheprovider -rA $ids tests/kernels/test_nearest.py::test_gpu_graphed_training_step \
  > "$OUT/tests.log" 2>&1
echo "tests exit $?" >> "$OUT/tests.log"; tail -n 3 "$OUT/tests.log"
SKIP_TESTS=1 CASES=none SKIP_THROUGHPUT=1 LIMIT=${LIMIT:-150} OUT="$OUT/speed" bash eval/gpu/speed.sh > "$OUT/speed.log" 2>&1
echo "speed exit $?" >> "$OUT/speed.log"; grep "^| 32768" "$OUT/speed.log" | cut -c1-200
