#!/usr/bin/env bash
# Stage 2: joint image + label diffusion on COCO (80 classes + background) with the paper's recipe
# (METHOD.md §3): 512 px, lr 5e-5 constant, effective batch 64 (8 per GPU x 4 GPUs x 2
# accumulation), fp16, 8-bit AdamW, grad clip 1, 20 epochs, a checkpoint every 1000 steps.
# Hardware: 4 GPUs (>= 24 GB each). Time: 118k images x 20 epochs = 37k steps of 64; unmeasured
# estimate ~2-3 days on 4 A100s. Needs $INIT from inference.jodiffusion (SD 1.5 + the COCO label
# VAE) first. Other GPU counts: keep BATCH x GPUS x ACCUM = 64. Rerunning resumes.
set -euo pipefail
GPUS=${GPUS:-4}
BATCH=${BATCH:-8}
ACCUM=${ACCUM:-2}
DATA_ROOT=${DATA_ROOT:-data/coco}
INIT=${INIT:-runs/coco/jodiffusion_init}
OUTPUT_DIR=${OUTPUT_DIR:-runs/coco/joint_5e5}
accelerate launch --multi_gpu --num_processes "$GPUS" -m train.joint_diffusion --mode joint \
    --dataset coco --data_root "$DATA_ROOT" --pretrained_model "$INIT" --output_dir "$OUTPUT_DIR" \
    --resolution 512 --learning_rate 5e-5 --lr_scheduler constant --train_batch_size "$BATCH" \
    --gradient_accumulation_steps "$ACCUM" --num_train_epochs 20 --mixed_precision fp16 \
    --use_8bit_adam true --max_grad_norm 1.0 --checkpointing_steps 1000 --checkpoints_total_limit 3 \
    --resume_from_checkpoint latest "$@"
