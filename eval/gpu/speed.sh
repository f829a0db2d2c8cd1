#!/usr/bin/env bash
# One device call for the speed measurements, one after another on a quiet GPU: the kernel
# GPU tests (each test in its own process, all at once), the nearest-code benchmark with its peers (flash-kmeans, FAISS where it imports,
# vector-quantize-pytorch) and the VQ-EMA training steps, then the tokenizer throughput with
# its peers (EnCodec, vector-quantize-pytorch inside our image backbone).
#   device run, carry [.whl]:  bash eval/gpu/speed.sh
#   SKIP_TESTS=1 / SKIP_BENCH=1 / SKIP_THROUGHPUT=1 leave a part out; TESTS_K=... narrows the tests (pytest -k)
#   and TESTS_PATHS=... picks their files (the kernels' and the export pipeline's GPU tests by default);
#   CASES=... narrows the bench
#   (CASES=none: its training steps only); THROUGHPUT_TIME seconds are kept for the throughput part
#   (THROUGHPUT_BATCHES=1,16,64 by default; COMPILE_TIME=0 leaves the compiled rows out; those are timed
#   in both layouts, channels-last too).
#   EXPORT_DATA=<folder of photos> adds the export benchmark (eval/benchmarks/export_speed.py, each
#   file listed EXPORT_REPEAT times, EXPORT_WORKERS loader processes: the export's default if unset; EXPORT_PRECISIONS=bf16 times that one only) in the last
#   EXPORT_TIME seconds; carry the folder.
#   SHOOTOUT_DATA=<train photos> SHOOTOUT_VAL=<held-apart photos> runs the quantizer shootout first
#   (eval/quantizer_shootout.py, SHOOTOUT_STEPS steps, SHOOTOUT_PARALLEL trainings at once, at most
#   SHOOTOUT_TIME seconds, SHOOTOUT_METHODS=a,b to run only those, SHOOTOUT_CODES codes each instead of
#   1024; needs the vector-quantize-pytorch wheels in .whl); carry both folders.
# Each part's time is bounded by what is left of LIMIT seconds; results land in $OUT/{kernels,throughput}.
set -u
source eval/gpu/setup.sh
OUT=${OUT:-results_tmp}; mkdir -p "$OUT"
LIMIT=${LIMIT:-575}; T0=$(date +%s)
RESERVE=$([ -n "${EXPORT_DATA:-}" ] && echo "${EXPORT_TIME:-120}" || echo 0)
left() { echo $(( LIMIT - RESERVE - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
if [ -n "${SHOOTOUT_DATA:-}" ]; then
  timeout "${SHOOTOUT_TIME:-300}" python3 -m tokenizers_vq.eval.quantizer_shootout --data "$SHOOTOUT_DATA" --val "$SHOOTOUT_VAL" \
    --steps "${SHOOTOUT_STEPS:-1000}" --parallel "${SHOOTOUT_PARALLEL:-10}" ${SHOOTOUT_METHODS:+--methods "$SHOOTOUT_METHODS"} ${SHOOTOUT_CODES:+--codebook-size "$SHOOTOUT_CODES"} --out "$OUT/shootout" > "$OUT/shootout.log" 2>&1
  echo "shootout exit $?" >> "$OUT/shootout.log"; tail -n 15 "$OUT/shootout.log"
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  bash eval/gpu/gpu_tests.sh "$OUT/kernel_tests.log" 16 "${TESTS_TIMEOUT:-300}"
fi
[ "${SKIP_THROUGHPUT:-0}" = 1 ] && THROUGHPUT_TIME=0  # no throughput part: nothing kept back for it
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  budget=$(( $(left) - ${THROUGHPUT_TIME:-150} - 90 ))
  [ "$budget" -gt 0 ] || budget=1
  timeout $(( $(left) - ${THROUGHPUT_TIME:-150} > 1 ? $(left) - ${THROUGHPUT_TIME:-150} : 1 )) python3 -m tokenizers_vq.eval.benchmarks.nearest --out "$OUT/kernels" \
    --budget "$budget" ${CASES:+--cases "$CASES"} > "$OUT/bench.log" 2>&1
  echo "bench exit $?" >> "$OUT/bench.log"
fi
if [ "${SKIP_THROUGHPUT:-0}" != 1 ]; then
  t=$(( $(left) - 15 - ${COMPILE_TIME:-90} ))
  if [ "$t" -gt 0 ]; then
    timeout "$t" python3 -m tokenizers_vq.eval.benchmarks.throughput --device cuda --batches "${THROUGHPUT_BATCHES:-1,16,64}" \
      --peers --min-seconds 0.3 --out "$OUT/throughput" > "$OUT/throughput.log" 2>&1
    echo "throughput exit $?" >> "$OUT/throughput.log"
  fi
  t=$(( $(left) - 15 ))  # compiled rows apart (one batch size: every new shape recompiles)
  if [ "$t" -gt 0 ]; then
    timeout "$t" python3 -m tokenizers_vq.eval.benchmarks.throughput --device cuda --models image --batches 64 \
      --compile image --channels-last image --min-seconds 0.3 --out "$OUT/throughput_compile" > "$OUT/throughput_compile.log" 2>&1
    echo "throughput exit $?" >> "$OUT/throughput_compile.log"
  fi
fi
if [ -n "${EXPORT_DATA:-}" ]; then
  RESERVE=0; t=$(( $(left) - 10 ))
  [ "$t" -gt 0 ] && timeout "$t" python3 -m tokenizers_vq.eval.benchmarks.export_speed "$EXPORT_DATA" --repeat "${EXPORT_REPEAT:-20}" \
    ${EXPORT_WORKERS:+--workers "$EXPORT_WORKERS"} ${EXPORT_PRECISIONS:+--precisions "$EXPORT_PRECISIONS"} --batch-size 64 --out "$OUT/export_speed" > "$OUT/export_speed.log" 2>&1
  echo "export bench exit $?" >> "$OUT/export_speed.log"; tail -n 20 "$OUT/export_speed.log"
fi
tail -n 15 "$OUT/kernel_tests.log" 2>/dev/null; tail -n 40 "$OUT/bench.log" 2>/dev/null; tail -n 30 "$OUT/throughput.log" 2>/dev/null
# at most 8 files come back: everything in one archive
tar -cf /tmp/speed.tar -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/speed.tar "$OUT/speed.tar"
