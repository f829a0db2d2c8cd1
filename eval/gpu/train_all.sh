#!/usr/bin/env bash
# One device call: trains the image, audio and video tokenizers side by
# side on one GPU within a time budget, measures 100k-code utilisation, then exports
# image tokens with the new image model and trains the small prior on them.
#   python eval/gpu/prepare_data.py images-train images-val audio video   # here, first
#   device run, carry [.devdata, .whl]:  bash eval/gpu/train_all.sh
# Everything worth keeping lands in $OUT as a few tar files (the tool returns 8 files).
set -u
source eval/gpu/setup.sh
OUT=${OUT:-results_tmp}; W=$OUT/work; mkdir -p "$W" runs
D=.devdata
IMG_MIN=${IMG_MIN:-5.5}; AV_MIN=${AV_MIN:-7.5}; LIMIT=${LIMIT:-555}
T0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$W/gpu.txt" 2>&1
MODS=${MODS:-"image audio video codebook"}  # a subset re-runs only those
has() { [[ " $MODS " == *" $1 "* ]]; }
common="--sample_every=0 --save_every=1000000 --steps=1000000 --log_every=50"

has audio && timeout $(left) python3 -m tokenizers_vq.cli train train/configs/audio.yaml $common --max_minutes=$AV_MIN \
  --data.train=$D/audio/librispeech --data.val_fraction=0 --out_dir=runs/audio > "$W/audio.log" 2>&1 &
has video && timeout $(left) python3 -m tokenizers_vq.cli train train/configs/video.yaml $common --max_minutes=$AV_MIN \
  --data.train=$D/video --out_dir=runs/video > "$W/video.log" 2>&1 &
has codebook && timeout $(left) python3 -m tokenizers_vq.eval.codebook_scale --train $D/images/train --val $D/images/val ${CS_ARGS:-} \
  --out "$W" > "$W/codebook_scale.log" 2>&1 &

# image: train, then export its tokens and train the prior on them
has image && timeout $(left) python3 -m tokenizers_vq.cli train train/configs/image.yaml $common --max_minutes=$IMG_MIN \
  --model.backbone.channels=64 --loss.disc_start=2000 \
  --data.train=$D/images/train --data.val=$D/images/val --out_dir=runs/image > "$W/image.log" 2>&1
M=runs/image/checkpoint/model
timeout $(left) python3 -m tokenizers_vq.cli export --model $M --data $D/images --out runs/export --batch-size 32 > "$W/export.log" 2>&1
timeout $(( $(left) - 15 )) python3 -m tokenizers_vq.cli prior --model $M --tokens runs/export --out runs/prior \
  --steps 1500 --batch-size 64 --max-minutes ${PRIOR_MIN:-1.6} > "$W/prior.log" 2>&1
wait

# fp16 model folders (<= 16 MiB each) and the logs, packed per modality
python3 - <<'PY' > "$W/pack.log" 2>&1
import torch
from pathlib import Path
from tokenizers_vq.tokenizer import Tokenizer
for m in ("image", "audio", "video"):
    src = Path(f"runs/{m}/checkpoint/model")
    if src.is_dir():
        Tokenizer.from_pretrained(src).save_pretrained(f"runs/{m}/release_fp16", dtype=torch.float16)
        print(m, "saved")
PY
for m in image audio video; do
  [ -d runs/$m ] && tar -cf "$OUT/$m.tar" -C runs/$m --exclude=checkpoint --exclude='checkpoint.old' . 2>>"$W/pack.log"
done
tar -cf "$OUT/prior.tar" -C runs prior export/manifest.json 2>>"$W/pack.log"
tar -cf "$OUT/logs.tar" -C "$OUT" work
ls -la "$OUT" runs/*/release_fp16 2>&1
tail -n 3 "$W"/*.log
