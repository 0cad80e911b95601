#!/usr/bin/env bash
# Stage 4, toy: mask optimization of the generated set, thresholds 20 / 50 / 100 px at 128²
# (configs/optimize_masks/toy.yaml says why).
# Writes ${IN}_optim20, _optim50, _optim100 beside the input; never edits the input.
# Hardware: CPU, all cores. Time: seconds.
# Usage: bash scripts/optim/toy_light.sh [--num_workers 8 ...]
set -euo pipefail
CONFIG=${CONFIG:-configs/optimize_masks/toy.yaml}
IN=${IN:-data/gen/toy}

python -m inference.optimize_masks --config "$CONFIG" --input "$IN" "$@"
