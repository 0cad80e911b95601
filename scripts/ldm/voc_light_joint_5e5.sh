#!/usr/bin/env bash
# Stage 2 of the voc chain: joint image + label diffusion on Pascal VOC (aug train, 10,582
# images).
# Recipe: CONFIG (default configs/joint_diffusion/voc.yaml: the paper's settings, cited there;
# its 8-bit AdamW needs bitsandbytes); copy it to change the recipe, or override one value with
# a flag. Other GPU counts: keep the recipe's effective batch (its header says how).
# Hardware: 4 GPUs (>= 24 GB each; SD-1.5 UNet with gradient checkpointing).
# Memory: 12.71 GiB per GPU at batch 8 with gradient checkpointing (17.93 GiB without), computed by
# python -m bench.bench_memory (calibrated on a measured H100 step, bench/results/gpu_smoke.json).
# Time: 10.6k images x 100 epochs = 33k steps; unmeasured estimate ~1 day on 4 A100s.
# First, once: weight initialisation (inference.jodiffusion) from BASE_MODEL (SD 1.5, downloaded from the
# hub unless a local folder) + the label VAE of scripts/ae/voc_light.sh -> $INIT; skipped when
# $INIT/model_index.json (written last) exists: delete $INIT to redo it with another label VAE.
# Real data: DATA_ROOT (default: data_root of dataset/voc_semantic.py). Rerunning resumes from the
# latest checkpoint.
# Output: $OUTPUT_DIR/pipeline/ (JoDiffusionPipeline) -> next: scripts/gen/voc_light.sh (its PIPELINE).
set -euo pipefail
GPUS=${GPUS:-4}
CONFIG=${CONFIG:-configs/joint_diffusion/voc.yaml}
DATA_ROOT=${DATA_ROOT:-data/VOCdevkit/VOC2012}
BASE_MODEL=${BASE_MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}
LABEL_VAE=${LABEL_VAE:-runs/voc/label_vae_run/label_vae}
INIT=${INIT:-runs/voc/jodiffusion_init}
OUTPUT_DIR=${OUTPUT_DIR:-runs/voc/joint_5e5}
[ -f "$INIT/model_index.json" ] || python -m inference.jodiffusion --base_model "$BASE_MODEL" \
    --label_vae "$LABEL_VAE" --output_dir "$INIT"
accelerate launch --multi_gpu --num_processes "$GPUS" -m train.joint_diffusion --config "$CONFIG" \
    --data_root "$DATA_ROOT" --pretrained_model "$INIT" --output_dir "$OUTPUT_DIR" "$@"
