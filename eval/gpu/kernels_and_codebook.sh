#!/usr/bin/env bash
# One device call for the two open GPU targets (prepared in session 3, not yet run):
# the kernel GPU tests with the packed v3 variant, the kernel benchmark (v1 and packed
# side by side with the peers, issue 3), then the projected-codebook utilisation
# at K = 8192 over all 100 val photos (117 held-out tokens per code, VQGAN-LC's ratio),
# frozen and trainable encoder (issue 5). The K = 100,000 run takes a call of its own:
#   CODEBOOK_K=100000 bash eval/gpu/kernels_and_codebook.sh   (with SKIP_KERNELS=1)
#   here first: python eval/gpu/prepare_data.py images-train images-val
#   device run, carry [.devdata, .whl]:  bash eval/gpu/kernels_and_codebook.sh
set -u
source eval/gpu/setup.sh
OUT=${OUT:-results_tmp}; W=$OUT/work; mkdir -p "$W"
if [ "${SKIP_KERNELS:-0}" != 1 ]; then
  # with them, the LPIPS loss against the lpips package (skipped on the CPU machine: no torchvision there)
  timeout 300 python3 -m pytest tests/kernels tests/train/test_losses.py -k "gpu or lpips_package" -q -p no:cacheprovider \
    -rA --durations=10 > "$W/kernel_tests.log" 2>&1
  echo "kernel tests exit $?" >> "$W/kernel_tests.log"
  timeout 240 python3 -m tokenizers_vq.kernels.bench --out "$OUT/kernels" --budget 200 > "$W/bench.log" 2>&1
  echo "bench exit $?" >> "$W/bench.log"
fi
timeout "${CODEBOOK_TIMEOUT:-240}" python3 -m tokenizers_vq.eval.codebook_scale --train .devdata/images/train \
  --val .devdata/images/val --encoder both --k "${CODEBOOK_K:-8192}" --out "$OUT/codebook" > "$W/codebook.log" 2>&1
echo "codebook exit $?" >> "$W/codebook.log"
tar -cf "$OUT/logs.tar" -C "$OUT" work
tail -n 30 "$W/kernel_tests.log" "$W/bench.log" "$W/codebook.log" 2>/dev/null
