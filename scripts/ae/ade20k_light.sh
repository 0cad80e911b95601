#!/usr/bin/env bash
# Stage 1 of the ade20k chain: train the lightweight label VAE (~15M parameters) on ADE20K (150 classes + background).
# Recipe: CONFIG (default configs/label_vae/ade20k.yaml, the paper's settings, cited there); copy it
# to change the recipe, or override one value with a flag (bash scripts/ae/ade20k_light.sh --learning_rate 2e-5).
# Hardware: 1+ GPUs (>= 16 GB each). Memory: 11.1 GiB per GPU at batch 4
# (computed by python -m bench.bench_memory; batch 8 would need 19.45 GiB).
# Time: 20k images x 100 epochs = 63k steps of 32; unmeasured estimate 10-15 h on one A100.
# Real data: DATA_ROOT (default: data_root of dataset/ade20k_semantic.py).
# Other GPU counts: the recipe's effective batch must be a multiple of 4 x GPUS (its header says how).
# Output: $OUTPUT_DIR/label_vae/ (save_pretrained), latent_stats.json, validation/*.png.
# Next: scripts/ldm/ade20k_light_joint_5e5.sh (its LABEL_VAE default is $OUTPUT_DIR/label_vae).
set -euo pipefail
GPUS=${GPUS:-1}
CONFIG=${CONFIG:-configs/label_vae/ade20k.yaml}
DATA_ROOT=${DATA_ROOT:-data/ade/ADEChallengeData2016}
OUTPUT_DIR=${OUTPUT_DIR:-runs/ade20k/label_vae_run}
accelerate launch --num_processes "$GPUS" -m train.label_vae --config "$CONFIG" --data_root "$DATA_ROOT" \
    --output_dir "$OUTPUT_DIR" "$@"
