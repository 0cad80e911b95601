#!/usr/bin/env bash
# Stage 1 of the voc chain: train the lightweight label VAE (~15M parameters) on VOC 2012 aug.
# Recipe: CONFIG (default configs/label_vae/voc.yaml, the paper's settings, cited there); copy it
# to change the recipe, or override one value with a flag (bash scripts/ae/voc_light.sh --learning_rate 2e-5).
# Hardware: 1+ GPUs (>= 16 GB each). Memory: 10.58 GiB per GPU at batch 4
# (computed by python -m bench.bench_memory; batch 8 would need 18.41 GiB).
# Time: 10.6k images x 50 epochs = 16.5k steps of 32; unmeasured estimate 3-4 h on one A100.
# Real data: DATA_ROOT (default: data_root of dataset/voc_semantic.py).
# Other GPU counts: the recipe's effective batch must be a multiple of 4 x GPUS (its header says how).
# Output: $OUTPUT_DIR/label_vae/ (save_pretrained), latent_stats.json, validation/*.png.
# Next: scripts/ldm/voc_light_joint_5e5.sh (its LABEL_VAE default is $OUTPUT_DIR/label_vae).
set -euo pipefail
GPUS=${GPUS:-1}
CONFIG=${CONFIG:-configs/label_vae/voc.yaml}
DATA_ROOT=${DATA_ROOT:-data/VOCdevkit/VOC2012}
OUTPUT_DIR=${OUTPUT_DIR:-runs/voc/label_vae_run}
accelerate launch --num_processes "$GPUS" -m train.label_vae --config "$CONFIG" --data_root "$DATA_ROOT" \
    --output_dir "$OUTPUT_DIR" "$@"
