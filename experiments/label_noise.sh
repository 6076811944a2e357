#!/usr/bin/env bash
# Experiment (b), CE paper Fig. 4b: BN vs CE under label corruption p in {0, .2, .4, .6, .8}
# (that fraction of training labels replaced uniformly at random, fixed by the seed).
#   bash experiments/label_noise.sh     (OUT=runs/label_noise, SEEDS="0", EPOCHS from the config)
# More seeds for error bars: SEEDS="0 1" bash experiments/label_noise.sh (runs of seed s > 0 are
# named ..._s<s>; compare averages the seeds of each model and noise level).
set -euo pipefail
cd "$(dirname "$0")/.."
CENET=${CENET:-.venv/bin/cenet}
OUT=${OUT:-runs/label_noise}
DOCS=${DOCS:-docs/experiments/label_noise}
runs=()
for p in 0.0 0.2 0.4 0.6 0.8; do
  for variant in "" _ce; do
    for seed in ${SEEDS:-0}; do
      run="$OUT/vgg11${variant:-_bn}_noise$p"
      [ "$seed" = 0 ] || run="${run}_s$seed"
      runs+=("$run")
      if [ -f "$run/last.pt" ]; then mode=--resume; else mode=--overwrite; fi
      "$CENET" -q train --config experiments/channel_blocks.yaml --model "cifar_vgg11$variant" \
        --label-noise "$p" --seed "$seed" --out "$run" $mode --no-progress
    done
  done
done
"$CENET" compare "${runs[@]}" --out "$DOCS" --sweep label_noise
