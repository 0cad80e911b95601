#!/usr/bin/env bash
# DiffuMask baseline on toy: images from Stable Diffusion, masks from its cross-attention maps.
# Hardware: CPU. Time: ~5 min for 2000 pairs at 32 px (20 steps).
# Then optionally: python -m inference.diffumask_noise_filter --data_dir $OUTPUT_DIR
#                  python -m inference.diffumask_mosaic --data_dir $OUTPUT_DIR --output_dir ${OUTPUT_DIR}_mosaic
set -euo pipefail
CONFIG=${CONFIG:-configs/diffumask/toy.yaml}
BASE_MODEL=${BASE_MODEL:-runs/toy/base_model}
OUTPUT_DIR=${OUTPUT_DIR:-data/diffumask/toy}
python -m inference.diffumask --config "$CONFIG" \
    --base_model "$BASE_MODEL" --output_dir "$OUTPUT_DIR" "$@"
