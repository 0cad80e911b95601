#!/usr/bin/env bash
# Toy stage 2 on CPU (2 cores, ~2-3 minutes with configs/joint_diffusion/toy.yaml; the benchmark
# profile CONFIG=configs/joint_diffusion/toy_bench.yaml takes ~25 minutes). Joint training of
# the widened toy UNet on cached latents. Chain before it: scripts/ldm/toy_base_model.sh ->
# python -m train.joint_diffusion --config configs/joint_diffusion/toy_image.yaml
#   --pretrained_model runs/toy/base_model --output_dir runs/toy/image_unet ->
# python -m inference.jodiffusion --base_model runs/toy/image_unet/pipeline
#   --label_vae runs/label_vae_toy/label_vae --output_dir runs/toy/jodiffusion_init.
# Output: $OUTPUT_DIR/pipeline (JoDiffusionPipeline), validation/*.png, metrics.jsonl.
set -euo pipefail
CONFIG=${CONFIG:-configs/joint_diffusion/toy.yaml}
DATA_ROOT=${DATA_ROOT:-data/toy}
INIT=${INIT:-runs/toy/jodiffusion_init}
OUTPUT_DIR=${OUTPUT_DIR:-runs/toy/joint}
python -m train.joint_diffusion --config "$CONFIG" --mode joint --dataset toy --data_root "$DATA_ROOT" \
    --pretrained_model "$INIT" --output_dir "$OUTPUT_DIR" --resume_from_checkpoint latest "$@"
