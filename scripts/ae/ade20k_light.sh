#!/usr/bin/env bash
# Stage 1 of the ade20k chain: train the lightweight label VAE on ADE20K (150 classes + background) with the
# paper's recipe (METHOD.md §2): 512 px, AdamW wd 0.05, lr 1e-4, effective batch 32 (4 per GPU,
# accumulation fills the rest), fp16, grad clip 3, 100 epochs; ~15M parameters.
# Hardware: 1+ GPUs (>= 16 GB each). Memory: 11.1 GiB per GPU at batch 4
# (computed by python -m bench.bench_memory; batch 8 would need 19.45 GiB).
# Time: 20k images x 100 epochs = 63k steps of 32; unmeasured estimate 10-15 h on one A100.
# Latent scale: --scaling_factor auto = 1/std of the latents, measured at the end of training on a
# spread sample of training masks and stored in label_vae/config.json (the joint trainer and the
# pipeline read it there); the authors' fixed value is --scaling_factor 0.2.
# Real data: DATA_ROOT (default: data_root of dataset/ade20k_semantic.py).
# Other GPU counts: 32 must be a multiple of 4 x GPUS (GPUS=16: --train_batch_size 2).
# Heavier alternative: append --model_type autoencoder_kl (SD-1.5 AutoencoderKL layout).
# Output: $OUTPUT_DIR/label_vae/ (save_pretrained), latent_stats.json, validation/*.png.
# Next: scripts/ldm/ade20k_light_joint_5e5.sh (its LABEL_VAE default is $OUTPUT_DIR/label_vae).
set -euo pipefail
GPUS=${GPUS:-1}
DATA_ROOT=${DATA_ROOT:-data/ade/ADEChallengeData2016}
OUTPUT_DIR=${OUTPUT_DIR:-runs/ade20k/label_vae_run}
accelerate launch --num_processes "$GPUS" -m train.label_vae --dataset ade20k --data_root "$DATA_ROOT" \
    --learning_rate 1e-4 --num_train_epochs 100 --resolution 512 --train_batch_size 4 --total_batch_size 32 \
    --scaling_factor auto --mixed_precision fp16 --resume_from_checkpoint latest --checkpoints_total_limit 3 \
    --output_dir "$OUTPUT_DIR" "$@"
