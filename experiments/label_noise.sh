#!/usr/bin/env bash
# Experiment (b), CE paper Fig. 4b: BN vs CE under label corruption p in {0, .2, .4, .6, .8}
# (that fraction of training labels replaced uniformly at random, fixed by the seed).
#   bash experiments/label_noise.sh     (OUT=runs/label_noise, EPOCHS from the config)
set -euo pipefail
cd "$(dirname "$0")/.."
CENET=${CENET:-.venv/bin/cenet}
OUT=${OUT:-runs/label_noise}
DOCS=${DOCS:-docs/experiments/label_noise}
runs=()
for p in 0.0 0.2 0.4 0.6 0.8; do
  for variant in "" _ce; do
    run="$OUT/vgg11${variant:-_bn}_noise$p"
    runs+=("$run")
    if [ -f "$run/last.pt" ]; then mode=--resume; else mode=--overwrite; fi
    "$CENET" -q train --config experiments/channel_blocks.yaml --model "cifar_vgg11$variant" \
      --label-noise "$p" --out "$run" $mode --no-progress
  done
done
"$CENET" compare "${runs[@]}" --out "$DOCS" --sweep label_noise
