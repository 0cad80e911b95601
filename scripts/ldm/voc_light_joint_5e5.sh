#!/usr/bin/env bash
# Stage 2: joint image + label diffusion on Pascal VOC (aug train, 10,582 images) with the paper's
# recipe (METHOD.md §3): 512 px,
# lr 5e-5 constant, effective batch 32 (8 per GPU x 4 GPUs), fp16, 8-bit AdamW, grad clip 1,
# 100 epochs, a checkpoint every 1000 steps. Hardware: 4 GPUs (>= 24 GB each; SD-1.5 UNet with
# gradient checkpointing). Time: 10.6k images x 100 epochs = 33k steps; unmeasured estimate ~1 day
# on 4 A100s. Needs $INIT from inference.jodiffusion (SD 1.5 + the VOC label VAE) first.
# Other GPU counts: keep BATCH x GPUS x ACCUM = 32. Rerunning resumes from the latest checkpoint.
set -euo pipefail
GPUS=${GPUS:-4}
BATCH=${BATCH:-8}
ACCUM=${ACCUM:-1}
DATA_ROOT=${DATA_ROOT:-data/VOCdevkit/VOC2012}
INIT=${INIT:-runs/voc/jodiffusion_init}
OUTPUT_DIR=${OUTPUT_DIR:-runs/voc/joint_5e5}
accelerate launch --multi_gpu --num_processes "$GPUS" -m train.joint_diffusion --mode joint \
    --dataset voc --data_root "$DATA_ROOT" --pretrained_model "$INIT" --output_dir "$OUTPUT_DIR" \
    --resolution 512 --learning_rate 5e-5 --lr_scheduler constant --train_batch_size "$BATCH" \
    --gradient_accumulation_steps "$ACCUM" --num_train_epochs 100 --mixed_precision fp16 \
    --use_8bit_adam true --max_grad_norm 1.0 --checkpointing_steps 1000 --checkpoints_total_limit 3 \
    --resume_from_checkpoint latest "$@"
