#!/usr/bin/env bash
# Stage 3 of the ade20k chain with the authors' own model: generate 40000 image + mask pairs with their
# JoDiffusion U-ViT (UniDiffuser-v1 + label tokens, METHOD.md §8) and their ade20k label VAE.
# Recipe: CONFIG (default configs/generate/ade20k.yaml: the paper's sampler, steps, guidance, prompts);
# their text2img procedure (models/pipeline_uvit.py). Masks are written in this project's label
# convention (docs/label_conventions.md).
# Hardware: GPUS GPU(s), fp16. Memory: 3.78 GiB per GPU at batch 8 (computed, python -m bench.bench_memory).
# Time: not measured on a GPU yet (CPU figures: bench/results/uvit_speed.json).
# Same seed -> same bytes whatever GPUS is; rerun the same command to resume.
# Input: PIPELINE = a U-ViT pipeline folder (image_vae/ text_encoder/ clip_tokenizer/ label_vae/
# unet/ scheduler/), e.g. from: python -m inference.fetch_weights --source HUB_ID_OR_FOLDER --output_dir $PIPELINE
# The captions are read from the real data: DATA_ROOT (default: data_root of dataset/ade20k_semantic.py).
# Output: $OUT (mmseg layout) -> next: IN=$OUT bash scripts/optim/ade20k_light.sh, then scripts/seg/.
# Usage: GPUS=8 bash scripts/gen/ade20k_uvit.sh [--any_flag value ...]
set -euo pipefail
GPUS=${GPUS:-1}
CONFIG=${CONFIG:-configs/generate/ade20k.yaml}
DATA_ROOT=${DATA_ROOT:-data/ade/ADEChallengeData2016}
PIPELINE=${PIPELINE:-weights/jodiffusion/ade20k}
OUT=${OUT:-data/synthetic/ade20k/jodiffusion_uvit}

accelerate launch --num_processes "$GPUS" -m inference.generate --config "$CONFIG" \
  --pipeline "$PIPELINE" --data_root "$DATA_ROOT" --output_dir "$OUT" "$@"
