#!/usr/bin/env bash
# Experiment (c), CE paper Fig. 4d,e: inhibited-channel ratio and top-1 of BN, BD and CE as
# the weight decay grows; the ratio is recorded every epoch (--record-channels) and by analyze.
#   bash experiments/weight_decay.sh    (OUT=runs/weight_decay)
# A reduced sweep: WDS="5e-4 5e-3" VARIANTS="_bn _ce" bash experiments/weight_decay.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CENET=${CENET:-.venv/bin/cenet}
OUT=${OUT:-runs/weight_decay}
DOCS=${DOCS:-docs/experiments/weight_decay}
runs=()
for wd in ${WDS:-1e-4 5e-4 1e-3 5e-3}; do
  for variant in ${VARIANTS:-_bn _bd _ce}; do
    run="$OUT/vgg11${variant}_wd$wd"
    model="cifar_vgg11${variant#_bn}"
    runs+=("$run")
    if [ -f "$run/last.pt" ]; then mode=--resume; else mode=--overwrite; fi
    "$CENET" -q train --config experiments/channel_blocks.yaml --model "$model" \
      --weight-decay "$wd" --record-channels 4 --out "$run" $mode --no-progress
    "$CENET" analyze "$run" --out "$run/analysis" --batches "${BATCHES:-6}" --ablation-repeats 3
  done
done
"$CENET" compare "${runs[@]}" --out "$DOCS" --sweep weight_decay
