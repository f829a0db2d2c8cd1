#!/usr/bin/env bash
# One device call: the kernel benchmark alone on the GPU
# (default kernel and the tiled kernel side by side with the peers), then the kernel GPU tests
# and the LPIPS-vs-lpips-package test side by side with the projected-codebook
# utilisation run at K = ${CODEBOOK_K:-100000} over all 100 val photos.
#   here first: python eval/gpu/prepare_data.py images-train images-val
#   device run, carry [.devdata/images, .whl]:  bash eval/gpu/kernels_and_codebook.sh
#   SKIP_BENCH=1 / SKIP_TESTS=1 / SKIP_CODEBOOK=1 leave a part out; SWEEP_PARTS=wide,... runs those
#   parts of eval/benchmarks/sweep.py first; TESTS_K narrows the GPU tests (pytest -k); RD=1 adds the rate-distortion
#   table (SKIP_BENCH=1 SKIP_TESTS=1 RD=1 gives the utilisation and the table in one call); the timeouts below sum to
#   under the device tool's 600 s per call, and at most 8 files land in $OUT
#   (3 logs, 3 bench, 2 codebook).
set -u
source eval/gpu/setup.sh
OUT=${OUT:-results_tmp}; mkdir -p "$OUT"
if [ -n "${SWEEP_PARTS:-}" ]; then  # e.g. SWEEP_PARTS=wide: tuning rows first, alone on the GPU
  timeout "${SWEEP_TIMEOUT:-150}" python3 -m tokenizers_vq.eval.benchmarks.sweep --parts "$SWEEP_PARTS" --out "$OUT/sweep" \
    > "$OUT/sweep.log" 2>&1
  echo "sweep exit $?" >> "$OUT/sweep.log"
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  timeout "${BENCH_TIMEOUT:-250}" python3 -m tokenizers_vq.eval.benchmarks.nearest --out "$OUT/kernels" --budget "${BENCH_BUDGET:-170}" \
    > "$OUT/bench.log" 2>&1
  echo "bench exit $?" >> "$OUT/bench.log"
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  ( timeout "${TESTS_TIMEOUT:-300}" python3 -m pytest tests/kernels tests/train/test_losses.py -k "${TESTS_K:-gpu or lpips_package}" \
      -v -p no:cacheprovider -rA --durations=15 > "$OUT/kernel_tests.log" 2>&1
    echo "kernel tests exit $?" >> "$OUT/kernel_tests.log" ) &
fi
if [ "${SKIP_CODEBOOK:-0}" != 1 ]; then
  timeout "${CODEBOOK_TIMEOUT:-300}" python3 -m tokenizers_vq.eval.codebook_scale --train .devdata/images/train \
    --val .devdata/images/val --encoder both --k "${CODEBOOK_K:-100000}" --out "$OUT/codebook" > "$OUT/codebook.log" 2>&1
  echo "codebook exit $?" >> "$OUT/codebook.log"
fi
wait
if [ "${RD:-0}" = 1 ]; then  # the rate-distortion table of the shrunk image tokenizer, in the same call
  # as the utilisation run; use with SKIP_BENCH=1 SKIP_TESTS=1 (8 files at most in $OUT)
  timeout "${RD_TIMEOUT:-200}" python3 -m tokenizers_vq.eval.rate_distortion .devdata/images/val 100 "$OUT/rd" \
    --sizes 256,64,16 --device cuda > "$OUT/rd.log" 2>&1
  echo "rate-distortion exit $?" >> "$OUT/rd.log"
fi
tail -n 30 "$OUT/bench.log"; tail -n 25 "$OUT/kernel_tests.log" "$OUT/codebook.log" 2>/dev/null
