#!/usr/bin/env bash
# Stage 4, ade20k: mask optimization of the generated set, thresholds 20 / 50 / 100 px at 512².
# Writes ${IN}_optim20, _optim50, _optim100 beside the input; never edits the input.
# Hardware: CPU, all cores. Time: about 10-30 min for 40k-80k masks on 16 cores.
# Usage: bash scripts/optim/ade20k_light.sh [--num_workers 8 ...]
set -euo pipefail
IN=${IN:-data/gen/ade20k}

python -m inference.optimize_masks --input "$IN" --thresholds 20 50 100 --reference_size 512 "$@"
