#!/usr/bin/env bash
# Stage 3 of the coco chain with the authors' own model: generate 80000 image + mask pairs with their
# JoDiffusion U-ViT (UniDiffuser-v1 + label tokens, METHOD.md §8) and their coco label VAE.
# Recipe: CONFIG (default configs/generate/coco.yaml: the paper's sampler, steps, guidance, prompts);
# their text2img procedure (models/pipeline_uvit.py). Masks are written in this project's label
# convention (docs/label_conventions.md).
# Hardware: GPUS GPU(s), fp16. Memory: 3.78 GiB per GPU at batch 8 (computed, python -m bench.bench_memory).
# Time: not measured on a GPU yet (CPU figures: bench/results/uvit_speed.json).
# Same seed -> same bytes whatever GPUS is; rerun the same command to resume.
# Input: PIPELINE = a U-ViT pipeline folder (image_vae/ text_encoder/ clip_tokenizer/ label_vae/
# unet/ scheduler/), e.g. from: python -m inference.fetch_weights --source HUB_ID_OR_FOLDER --output_dir $PIPELINE
# The captions are read from the real data: DATA_ROOT (default: data_root of dataset/coco_semantic.py).
# Output: $OUT (mmseg layout) -> next: IN=$OUT bash scripts/optim/coco_light.sh, then scripts/seg/.
# Usage: GPUS=8 bash scripts/gen/coco_uvit.sh [--any_flag value ...]
set -euo pipefail
GPUS=${GPUS:-1}
CONFIG=${CONFIG:-configs/generate/coco.yaml}
DATA_ROOT=${DATA_ROOT:-data/coco}
PIPELINE=${PIPELINE:-weights/jodiffusion/coco}
OUT=${OUT:-data/synthetic/coco/jodiffusion_uvit}

accelerate launch --num_processes "$GPUS" -m inference.generate --config "$CONFIG" \
  --pipeline "$PIPELINE" --data_root "$DATA_ROOT" --output_dir "$OUT" "$@"
