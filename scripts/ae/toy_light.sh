#!/usr/bin/env bash
# Stage 1, toy: train the label VAE on the 32 px toy shapes (data/toy) on CPU; recipe: CONFIG
# (default configs/label_vae/toy.yaml). Target: val reconstruction mIoU >= 0.98 (python -m
# bench.bench_label_vae checks it; bench/results/label_vae.json). Hardware: CPU, 2 cores.
# Time: est. ~3.5 min on one idle core (0.1 s/step measured in isolation) (measured 24 min wall on a heavily shared machine).
# Needs data/toy: python -m utils.make_toy_dataset --out data/toy --size 32
# Usage: bash scripts/ae/toy_light.sh [--max_train_steps 500 ...]
set -euo pipefail
CONFIG=${CONFIG:-configs/label_vae/toy.yaml}
OUTPUT_DIR=${OUTPUT_DIR:-runs/label_vae_toy}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} python -m train.label_vae --dataset toy \
    --config "$CONFIG" --output_dir "$OUTPUT_DIR" --resume_from_checkpoint latest "$@"
