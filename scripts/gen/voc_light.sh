#!/usr/bin/env bash
# Stage 3, voc: generate 40000 image + mask pairs with the trained JoDiffusion pipeline
# (DPM-Solver++ 50 steps, guidance 8; prompts = the training captions, repeated and shuffled).
# Hardware: ${GPUS} GPU(s), fp16. Time: about 11 h on 1 A100 at 512 px (estimate, not measured), divided by GPUS.
# Same seed -> same bytes whatever GPUS is; rerun the same command to resume.
# Usage: GPUS=8 bash scripts/gen/voc_light.sh [--any_flag value ...]
set -euo pipefail
GPUS=${GPUS:-1}
PIPELINE=${PIPELINE:-runs/voc/jodiffusion}
OUT=${OUT:-data/gen/voc}

accelerate launch --num_processes "$GPUS" -m inference.generate \
  --pipeline "$PIPELINE" --dataset voc --num_pairs 40000 --prompt_source captions \
  --scheduler dpmsolver++ --num_inference_steps 50 --guidance_scale 8 --output_dir "$OUT" "$@"
