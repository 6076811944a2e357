#!/usr/bin/env bash
# Experiment (d), CE paper Sec. 5.3: CE after 100%, 75%, 50% of the BN layers of VGG-16
# (paper: 89.7 / 89.6 / 89.4) and the position conv-CE-BN-ReLU vs conv-BN-CE-ReLU (88.8 / 89.6).
#   bash experiments/placement.sh       (OUT=runs/placement)
set -euo pipefail
cd "$(dirname "$0")/.."
CENET=${CENET:-.venv/bin/cenet}
OUT=${OUT:-runs/placement}
DOCS=${DOCS:-docs/experiments/placement}
runs=()
train() {  # name, then extra model_kwargs entries
  local run="$OUT/$1"; shift
  runs+=("$run")
  if [ -f "$run/last.pt" ]; then mode=--resume; else mode=--overwrite; fi
  "$CENET" -q train --config experiments/channel_blocks.yaml --model cifar_vgg16_ce \
    --set "model_kwargs={width: 0.25$*}" --out "$run" $mode --no-progress
}
train ce100
train ce75 ", attn_ratio: 0.75"
train ce50 ", attn_ratio: 0.5"
train ce_before_bn ", attn_position: before_norm"
"$CENET" compare "${runs[@]}" --out "$DOCS"
