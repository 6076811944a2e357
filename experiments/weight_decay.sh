#!/usr/bin/env bash
# Experiment (c), CE paper Fig. 4d,e: inhibited-channel ratio and top-1 of BN, BD and CE as
# the weight decay grows; the ratio is recorded every epoch (--record-channels) and by analyze.
#   bash experiments/weight_decay.sh    (OUT=runs/weight_decay)
set -euo pipefail
cd "$(dirname "$0")/.."
CENET=${CENET:-.venv/bin/cenet}
OUT=${OUT:-runs/weight_decay}
DOCS=${DOCS:-docs/experiments/weight_decay}
runs=()
for wd in 1e-4 5e-4 1e-3 5e-3; do
  for variant in "" _bd _ce; do
    run="$OUT/vgg11${variant:-_bn}_wd$wd"
    runs+=("$run")
    if [ -f "$run/last.pt" ]; then mode=--resume; else mode=--overwrite; fi
    "$CENET" -q train --config experiments/channel_blocks.yaml --model "cifar_vgg11$variant" \
      --weight-decay "$wd" --record-channels 4 --out "$run" $mode --no-progress
    "$CENET" analyze "$run" --out "$run/analysis" --batches "${BATCHES:-6}" --ablation-repeats 3
  done
done
"$CENET" compare "${runs[@]}" --out "$DOCS"
