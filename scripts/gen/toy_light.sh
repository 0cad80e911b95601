#!/usr/bin/env bash
# Stage 3, toy: generate 2000 pairs (32 px) from the toy JoDiffusion pipeline on CPU.
# DPM-Solver++ 50 steps (the paper's sampler) at guidance 3, not the paper's 8: on the toy model 8
# draws shapes ~50% too large and agrees less with the prompt (configs/generate/toy.yaml).
# Hardware: CPU, GPUS processes (default 1). Time: a few minutes on 2 cores.
# Same seed and --cpu_threads -> same bytes whatever GPUS is; rerun the same command to resume.
# Usage: bash scripts/gen/toy_light.sh [--num_pairs 200 ...]
set -euo pipefail
GPUS=${GPUS:-1}
CONFIG=${CONFIG:-configs/generate/toy.yaml}
PIPELINE=${PIPELINE:-runs/toy/jodiffusion}
OUT=${OUT:-data/gen/toy}

# accelerate launch --cpu runs one process; torchrun starts GPUS CPU workers that accelerate joins
ACCELERATE_USE_CPU=true torchrun --standalone --nproc_per_node "$GPUS" -m inference.generate \
  --config "$CONFIG" --pipeline "$PIPELINE" --output_dir "$OUT" "$@"
