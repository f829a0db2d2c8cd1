#!/usr/bin/env bash
# One device call: the packed kernel's tile grid on the cases where the search is furthest
# from its targets (eval/benchmarks/tile_sweep.py), compiled by 16 processes, then timed.
#   device run, carry [.whl]:  bash eval/gpu/tile_sweep.sh
#   CASES=NxKxD,... narrows the cases; SPLITS=NxKxD=auto/4/...,... the codebook splits tried;
#   BUDGET seconds of timing (default 280).
set -u
source eval/gpu/setup.sh
OUT=${OUT:-results_tmp}; mkdir -p "$OUT"
timeout "${LIMIT:-560}" python3 -m tokenizers_vq.eval.benchmarks.tile_sweep --out "$OUT/tiles" --workers 16 \
  --budget "${BUDGET:-280}" ${CASES:+--cases "$CASES"} ${SPLITS:+--splits "$SPLITS"} > "$OUT/tiles.log" 2>&1
echo "tile sweep exit $?" >> "$OUT/tiles.log"
grep -v '^{"n"' "$OUT/tiles.log" | tail -n 20; cat "$OUT/tiles/tiles.md" 2>/dev/null
