#!/usr/bin/env bash
# Stage 3, toy: generate 2000 pairs (32 px) from the toy JoDiffusion pipeline on CPU.
# DPM-Solver++ 50 steps (the paper's sampler) at guidance 3, not the paper's 8: on the toy model 8
# draws shapes ~50% too large and agrees less with the prompt (configs/generate/toy.yaml).
# Hardware: CPU, GPUS processes (default 1). Time: a few minutes on 2 cores.
# Same seed and --cpu_threads -> same bytes whatever GPUS is; rerun the same command to resume.
# Usage: bash scripts/gen/toy_light.sh [--num_pairs 200 ...]
set -euo pipefail
GPUS=${GPUS:-1}
PIPELINE=${PIPELINE:-runs/toy/jodiffusion}
OUT=${OUT:-data/gen/toy}

# accelerate launch --cpu runs one process; torchrun starts GPUS CPU workers that accelerate joins
ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node "$GPUS" -m inference.generate \
  --pipeline "$PIPELINE" --dataset toy --num_pairs 2000 --prompt_source captions \
  --scheduler dpmsolver++ --num_inference_steps 50 --guidance_scale 3 --batch_size 64 \
  --cpu_threads 1 --output_dir "$OUT" "$@"
