#!/usr/bin/env bash
# Stage 1: train the lightweight label VAE on VOC 2012 aug with the paper's recipe (METHOD.md §2): 512 px,
# AdamW wd 0.05, lr 1e-5, effective batch 32 (8 per GPU, accumulation fills the rest), fp16,
# grad clip 3, 50 epochs; ~15M parameters. Hardware: 1+ GPUs (>= 16 GB each).
# Time: 10.6k images x 50 epochs = 16.5k steps of 32; unmeasured estimate 3-4 h on one A100.
# GPUS=8: add --train_batch_size 4 (32 must be a multiple of per-GPU batch x GPUS).
# Heavier alternative: append --model_type autoencoder_kl (SD-1.5 AutoencoderKL layout).
# Output: $OUTPUT_DIR/label_vae/ (save_pretrained), latent_stats.json, validation/*.png.
set -euo pipefail
GPUS=${GPUS:-1}
OUTPUT_DIR=${OUTPUT_DIR:-runs/label_vae_voc}
accelerate launch --num_processes "$GPUS" -m train.label_vae --dataset voc \
    --learning_rate 1e-5 --num_train_epochs 50 --resolution 512 --total_batch_size 32 \
    --mixed_precision fp16 --resume_from_checkpoint latest --checkpoints_total_limit 3 \
    --output_dir "$OUTPUT_DIR" "$@"
