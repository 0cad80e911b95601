#!/usr/bin/env bash
# Stage 4, toy: mask optimization of the generated set, thresholds 20 / 50 / 100 px at 128² (see below).
# Writes ${IN}_optim20, _optim50, _optim100 beside the input; never edits the input.
# Hardware: CPU, all cores. Time: seconds.
# Usage: bash scripts/optim/toy_light.sh [--num_workers 8 ...]
set -euo pipefail
IN=${IN:-data/gen/toy}

# toy masks are 32 px: at --reference_size 512 even 100 px scales to 0.4 px (a no-op), so the
# thresholds count pixels of a 128 px mask instead (1.25 / 3.1 / 6.25 px at 32 px)
python -m inference.optimize_masks --input "$IN" --thresholds 20 50 100 --reference_size 128 "$@"
