#!/usr/bin/env bash
# Experiment (a): BN vs SE vs GCT vs BD vs IR vs CE on CIFAR-10, same network and budget,
# SEEDS seeds each; then the analysis of every run and one comparison.
#   bash experiments/channel_blocks.sh            (OUT=runs/channel_blocks, SEEDS="0 1")
# A killed run is resumed from its last checkpoint when the script is started again.
set -euo pipefail
cd "$(dirname "$0")/.."
CENET=${CENET:-.venv/bin/cenet}
OUT=${OUT:-runs/channel_blocks}
SEEDS=${SEEDS:-0 1}
DOCS=${DOCS:-docs/experiments/channel_blocks}
runs=()
for variant in "" _se _gct _bd _ir _ce; do
  for seed in $SEEDS; do
    run="$OUT/vgg11${variant:-_bn}_s$seed"
    runs+=("$run")
    if [ -f "$run/last.pt" ]; then mode=--resume; else mode=--overwrite; fi
    "$CENET" -q train --config experiments/channel_blocks.yaml --model "cifar_vgg11$variant" \
      --seed "$seed" --out "$run" $mode --no-progress
  done
done
for run in "${runs[@]}"; do
  # 3,000 test images and 3 random ablation repeats per run keep the analysis to ~1 min
  "$CENET" analyze "$run" --out "$run/analysis" --batches "${BATCHES:-6}" --ablation-repeats 3
done
"$CENET" compare "${runs[@]}" --out "$DOCS"
