#!/usr/bin/env bash
# Stage 4 of the coco chain: mask optimization of the generated set, thresholds 20 / 50 / 100 px at 512²
# (CONFIG, default configs/optimize_masks/coco.yaml: the paper's three variants, cited there).
# Writes ${IN}_optim20, _optim50, _optim100 beside the input; never edits the input.
# Hardware: CPU, all cores. Time: ~40 masks/s per core at 512 px (bench/results/mask_optimization.json,
# three thresholds), so a few minutes for 40k-80k masks on 16 cores.
# Input: IN = the output of scripts/gen/coco_light.sh.
# Next: scripts/seg/coco_*.sh train on ${IN}_optim20 by default (their SYNTH; why 20: the config's
# header); the 50 / 100 px sets are for the ablation (SYNTH=${IN}_optim50 ...).
# Usage: bash scripts/optim/coco_light.sh [--num_workers 8 ...]
set -euo pipefail
CONFIG=${CONFIG:-configs/optimize_masks/coco.yaml}
IN=${IN:-data/synthetic/coco/jodiffusion}

python -m inference.optimize_masks --config "$CONFIG" --input "$IN" "$@"
