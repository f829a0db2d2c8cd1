#!/usr/bin/env bash
# One device call: the kernel test suite on the GPU (in-process CUDA groups, CUDA-graph
# capture, inductor) beside two short audio trainings: without an
# adversary, and with the adversary balanced by VQGAN's adaptive weight.
#   device run, carry [.devdata, .whl]:  bash eval/gpu/kernel_tests_and_audio.sh
set -u
source eval/gpu/setup.sh
OUT=${OUT:-results_tmp}; W=$OUT/work; mkdir -p "$W" runs
D=.devdata; AV_MIN=${AV_MIN:-6}
common="--sample_every=0 --save_every=1000000 --steps=1000000 --log_every=50 --max_minutes=$AV_MIN --data.train=$D/audio/librispeech --data.val_fraction=0"
timeout 480 python3 -m tokenizers_vq.cli train train/configs/audio.yaml $common --loss.adversarial=0 \
  --out_dir=runs/audio_nogan > "$W/audio_nogan.log" 2>&1 &
timeout 480 python3 -m tokenizers_vq.cli train train/configs/audio.yaml $common --loss.adaptive_weight=true \
  --loss.disc_start=1500 --out_dir=runs/audio_adaptive > "$W/audio_adaptive.log" 2>&1 &
timeout 450 python3 -m pytest tests/kernels -k gpu -q -p no:cacheprovider -rA --durations=15 > "$W/kernel_tests.log" 2>&1
echo "kernel tests exit $?" >> "$W/kernel_tests.log"
wait
python3 - <<'PY' > "$W/pack.log" 2>&1
import torch
from pathlib import Path
from tokenizers_vq.tokenizer import Tokenizer
for m in ("audio_nogan", "audio_adaptive"):
    src = Path(f"runs/{m}/checkpoint/model")
    if src.is_dir():
        Tokenizer.from_pretrained(src).save_pretrained(f"runs/{m}/release_fp16", dtype=torch.float16)
PY
for m in audio_nogan audio_adaptive; do
  [ -d runs/$m ] && tar -cf "$OUT/$m.tar" -C runs/$m --exclude=checkpoint --exclude='checkpoint.old' .
done
tar -cf "$OUT/logs.tar" -C "$OUT" work
tail -n 40 "$W/kernel_tests.log"
