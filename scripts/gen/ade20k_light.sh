#!/usr/bin/env bash
# Stage 3 of the ade20k chain: generate 40000 image + mask pairs with the trained JoDiffusion pipeline.
# Recipe: CONFIG (default configs/generate/ade20k.yaml: the paper's sampler, steps, guidance and
# prompts, cited there).
# Hardware: GPUS GPU(s), fp16. Memory: 3.25 GiB per GPU at batch 8 (bench.bench_memory). Time: about 11 h on 1 A100 at 512 px (estimate, not measured), divided by GPUS.
# Same seed -> same bytes whatever GPUS is; rerun the same command to resume.
# Input: PIPELINE = the pipeline/ folder scripts/ldm/ade20k_light_joint_5e5.sh exports. The captions are
# read from the real data: DATA_ROOT (default: data_root of dataset/ade20k_semantic.py).
# Output: $OUT (mmseg layout) -> next: scripts/optim/ade20k_light.sh (its IN).
# Usage: GPUS=8 bash scripts/gen/ade20k_light.sh [--any_flag value ...]
set -euo pipefail
GPUS=${GPUS:-1}
CONFIG=${CONFIG:-configs/generate/ade20k.yaml}
DATA_ROOT=${DATA_ROOT:-data/ade/ADEChallengeData2016}
PIPELINE=${PIPELINE:-runs/ade20k/joint_5e5/pipeline}
OUT=${OUT:-data/synthetic/ade20k/jodiffusion}

accelerate launch --num_processes "$GPUS" -m inference.generate --config "$CONFIG" \
  --pipeline "$PIPELINE" --data_root "$DATA_ROOT" --output_dir "$OUT" "$@"
