#!/usr/bin/env bash
# Stage 2 of the ade20k chain with the authors' backbone: UniDiffuser-v1's U-ViT with a label token
# stream, trained with their objective (models/uvit_training.py).
# Recipe: CONFIG (default configs/joint_diffusion/ade20k_uvit.yaml: their settings, cited there; its
# 8-bit AdamW needs bitsandbytes); copy it to change the recipe, or override one value with a flag.
# Hardware: 4 GPUs (>= 24 GB each).
# Memory: 16.63 GiB per GPU at batch 8 with gradient checkpointing (38.56 GiB without), computed by
# python -m bench.bench_memory (bench/results/memory.json); not measured on a GPU yet.
# Time: 20.2k images x 100 epochs = 63k steps; not measured.
# First, once: step 0 (inference.uvit_init) from UNIDIFFUSER (thu-ml/unidiffuser-v1, downloaded from
# the hub unless a local folder) + the label VAE of scripts/ae/ade20k_light.sh -> $INIT; skipped when
# $INIT/model_index.json (written last) exists: delete $INIT to redo it.
# Real data: DATA_ROOT (default: data_root of dataset/ade20k_semantic.py). Rerunning resumes.
# Output: $OUTPUT_DIR/pipeline/ (a U-ViT pipeline folder) -> next: PIPELINE=$OUTPUT_DIR/pipeline bash scripts/gen/ade20k_uvit.sh
set -euo pipefail
GPUS=${GPUS:-4}
CONFIG=${CONFIG:-configs/joint_diffusion/ade20k_uvit.yaml}
DATA_ROOT=${DATA_ROOT:-data/ade/ADEChallengeData2016}
UNIDIFFUSER=${UNIDIFFUSER:-thu-ml/unidiffuser-v1}
LABEL_VAE=${LABEL_VAE:-runs/ade20k/label_vae_run/label_vae}
INIT=${INIT:-runs/ade20k/uvit_init}
OUTPUT_DIR=${OUTPUT_DIR:-runs/ade20k/uvit_5e5}
[ -f "$INIT/model_index.json" ] || python -m inference.uvit_init --unidiffuser "$UNIDIFFUSER" \
    --label_vae "$LABEL_VAE" --output_dir "$INIT"
accelerate launch --multi_gpu --num_processes "$GPUS" -m train.joint_diffusion --config "$CONFIG" \
    --data_root "$DATA_ROOT" --pretrained_model "$INIT" --output_dir "$OUTPUT_DIR" "$@"
