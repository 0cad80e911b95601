#!/usr/bin/env bash
# Stage 2 of the ade20k chain: joint image + label diffusion on ADE20K with the paper's recipe
# (METHOD.md §3): 512 px, lr 5e-5 constant, effective batch 32 (8 per GPU x 4 GPUs), fp16,
# 8-bit AdamW (needs bitsandbytes), grad clip 1, 100 epochs, a checkpoint every 1000 steps.
# Hardware: 4 GPUs (>= 24 GB each; SD-1.5 UNet with gradient checkpointing).
# Memory: 12.71 GiB per GPU at batch 8 with gradient checkpointing (17.93 GiB without), computed by
# python -m bench.bench_memory (calibrated on a measured H100 step, bench/results/gpu_smoke.json).
# Time: 20k images x 100 epochs = 63k steps; unmeasured estimate ~2 days on 4 A100s.
# First, once: weight initialisation (inference.jodiffusion) from BASE_MODEL (SD 1.5, downloaded from the
# hub unless a local folder) + the label VAE of scripts/ae/ade20k_light.sh -> $INIT; skipped when
# $INIT/model_index.json (written last) exists: delete $INIT to redo it with another label VAE.
# Real data: DATA_ROOT (default: data_root of dataset/ade20k_semantic.py). Other GPU counts: keep
# BATCH x GPUS x ACCUM = 32. Rerunning resumes from the latest checkpoint.
# Output: $OUTPUT_DIR/pipeline/ (JoDiffusionPipeline) -> next: scripts/gen/ade20k_light.sh (its PIPELINE).
set -euo pipefail
GPUS=${GPUS:-4}
BATCH=${BATCH:-8}
ACCUM=${ACCUM:-1}
DATA_ROOT=${DATA_ROOT:-data/ade/ADEChallengeData2016}
BASE_MODEL=${BASE_MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
LABEL_VAE=${LABEL_VAE:-runs/ade20k/label_vae_run/label_vae}
INIT=${INIT:-runs/ade20k/jodiffusion_init}
OUTPUT_DIR=${OUTPUT_DIR:-runs/ade20k/joint_5e5}
[ -f "$INIT/model_index.json" ] || python -m inference.jodiffusion --base_model "$BASE_MODEL" \
    --label_vae "$LABEL_VAE" --output_dir "$INIT"
accelerate launch --multi_gpu --num_processes "$GPUS" -m train.joint_diffusion --mode joint \
    --dataset ade20k --data_root "$DATA_ROOT" --pretrained_model "$INIT" --output_dir "$OUTPUT_DIR" \
    --resolution 512 --learning_rate 5e-5 --lr_scheduler constant --train_batch_size "$BATCH" \
    --gradient_accumulation_steps "$ACCUM" --num_train_epochs 100 --mixed_precision fp16 \
    --use_8bit_adam true --max_grad_norm 1.0 --checkpointing_steps 1000 --checkpoints_total_limit 3 \
    --resume_from_checkpoint latest "$@"
