#!/usr/bin/env bash
# Stage 5 of the coco chain: Mask2Former R50 (mmseg) trained on synthetic coco pairs,
# evaluated on the real coco val split.
# Hardware: GPUS x 1 GPU (>= 24 GB), batch 4 per GPU (recipe: 4 GPUs = batch 16).
# Memory: about 7 GB per GPU at batch 4 (MMSegmentation logs 3.4 GB at batch 2 for this recipe on ADE20K); bench/results/memory.json.
# Time: ~2 days (160k iters) on 4 A100s.
# Synthetic data: SYNTH, by default the 20 px mask-optimized JoDiffusion set that
# scripts/optim/coco_light.sh writes (why 20: its header); DiffuMask's set:
#   SYNTH=data/synthetic/coco/diffumask_kept (scripts/diffumask/coco.sh: the pairs its noise filter keeps).
# Real data (val/test): DATA_ROOT (default: data_root of dataset/coco_semantic.py).
# Both go in as --cfg-options; a --cfg-options KEY=VALUE among the extra flags overrides them.
# The default WORK_DIR is named after the SYNTH folder, so runs on different sets stay apart.
# Real + synthetic: scripts/seg/coco_deeplabv3plus_r101_mix.sh (there is no Mask2Former mix config).
# Backbone: ImageNet-pretrained as in the config (its header: a local checkpoint, or from scratch).
# Extra flags go to train.segmenter: --resume, --eval-only --checkpoint FILE, --cfg-options KEY=VALUE.
set -euo pipefail
GPUS=${GPUS:-4}
DATA_ROOT=${DATA_ROOT:-data/coco}
SYNTH=${SYNTH:-data/synthetic/coco/jodiffusion_optim20}
CONFIG=${CONFIG:-configs/seg/coco_mask2former_r50_synthetic.py}
WORK_DIR=${WORK_DIR:-runs/coco/seg/mask2former_r50_${SYNTH##*/}}
torchrun --nproc_per_node="$GPUS" --master_port="${PORT:-29500}" -m train.segmenter "$CONFIG" \
    --launcher pytorch --work-dir "$WORK_DIR" --cfg-options "train_dataloader.dataset.data_root=$SYNTH" \
    "val_dataloader.dataset.data_root=$DATA_ROOT" "test_dataloader.dataset.data_root=$DATA_ROOT" "$@"
