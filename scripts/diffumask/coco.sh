#!/usr/bin/env bash
# DiffuMask baseline on coco: images from Stable Diffusion, masks from its cross-attention maps
# (configs/diffumask/coco.yaml: the paper's settings). Needs no real data.
# Hardware: 1+ GPUs (fp16). Memory: 3.02 GiB per GPU (bench.bench_memory). Time: SD 1.4 at 512 px, 50 steps: roughly 1-2 pairs/s per A100-class GPU.
# BASE_MODEL: SD 1.4, the model the DiffuMask paper used (hub id or local folder).
# Output: $OUTPUT_DIR (mmseg layout, every generated pair).
# Then DiffuMask's noise learning (inference.diffumask_noise_filter: 3-fold cross-validation of a small
# segmenter, the best 70% of pairs kept) writes the kept pairs as ${OUTPUT_DIR}_kept, which the same
# segmenter scripts as JoDiffusion's sets take:
#   SYNTH=data/synthetic/coco/diffumask_kept bash scripts/seg/coco_mask2former_r50.sh   (or coco_deeplabv3plus_r101.sh)
# Mosaics (optional): python -m inference.diffumask_mosaic --data_dir ${OUTPUT_DIR}_kept --output_dir ${OUTPUT_DIR}_mosaic
# Extra flags go to inference.diffumask; rerunning resumes the generation and redoes the filter.
set -euo pipefail
GPUS=${GPUS:-1}
CONFIG=${CONFIG:-configs/diffumask/coco.yaml}
BASE_MODEL=${BASE_MODEL:-CompVis/stable-diffusion-v1-4}
OUTPUT_DIR=${OUTPUT_DIR:-data/synthetic/coco/diffumask}
accelerate launch --num_processes "$GPUS" -m inference.diffumask --config "$CONFIG" \
    --base_model "$BASE_MODEL" --output_dir "$OUTPUT_DIR" "$@"
python -m inference.diffumask_noise_filter --data_dir "$OUTPUT_DIR"
