#!/usr/bin/env bash
# DiffuMask baseline on ade20k: images from Stable Diffusion, masks from its cross-attention maps.
# Hardware: 1+ GPUs (fp16). Time: SD 1.4 at 512 px, 50 steps: roughly 1-2 pairs/s per A100-class GPU.
# Then optionally: python -m inference.diffumask_noise_filter --data_dir $OUTPUT_DIR
#                  python -m inference.diffumask_mosaic --data_dir $OUTPUT_DIR --output_dir ${OUTPUT_DIR}_mosaic
set -euo pipefail
GPUS=${GPUS:-1}
BASE_MODEL=${BASE_MODEL:-CompVis/stable-diffusion-v1-4}
OUTPUT_DIR=${OUTPUT_DIR:-data/diffumask/ade20k}
accelerate launch --num_processes "$GPUS" -m inference.diffumask --config configs/diffumask/ade20k.yaml \
    --base_model "$BASE_MODEL" --output_dir "$OUTPUT_DIR" "$@"
