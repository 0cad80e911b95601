#!/usr/bin/env bash
# Stage 5 of the voc chain: DeepLabV3+ R101 (mmseg) trained on synthetic voc pairs,
# evaluated on the real voc val split.
# Hardware: GPUS x 1 GPU (>= 24 GB), batch 4 per GPU (recipe: 4 GPUs = batch 16).
# Memory: 11.0 GB per GPU at batch 4 (MMSegmentation's log of this recipe on VOC aug); bench/results/memory.json.
# Time: ~8 h (40k iters) on 4 A100s.
# Synthetic data: SYNTH, by default the 20 px mask-optimized JoDiffusion set that
# scripts/optim/voc_light.sh writes (why 20: its header); DiffuMask's set:
#   SYNTH=data/synthetic/voc/diffumask_kept (scripts/diffumask/voc.sh: the pairs its noise filter keeps).
# Real data (val/test): DATA_ROOT (default: data_root of dataset/voc_semantic.py).
# Both go in as --cfg-options; a --cfg-options KEY=VALUE among the extra flags overrides them.
# The default WORK_DIR is named after the SYNTH folder, so runs on different sets stay apart.
# Real + synthetic: scripts/seg/voc_deeplabv3plus_r101_mix.sh (CONFIG=..._mix.py here would not work).
# Backbone: ImageNet-pretrained as in the config (its header: a local checkpoint, or from scratch).
# Extra flags go to train.segmenter: --resume, --eval-only --checkpoint FILE, --cfg-options KEY=VALUE.
set -euo pipefail
GPUS=${GPUS:-4}
DATA_ROOT=${DATA_ROOT:-data/VOCdevkit/VOC2012}
SYNTH=${SYNTH:-data/synthetic/voc/jodiffusion_optim20}
CONFIG=${CONFIG:-configs/seg/voc_deeplabv3plus_r101_synthetic.py}
WORK_DIR=${WORK_DIR:-runs/voc/seg/deeplabv3plus_r101_${SYNTH##*/}}
torchrun --nproc_per_node="$GPUS" --master_port="${PORT:-29500}" -m train.segmenter "$CONFIG" \
    --launcher pytorch --work-dir "$WORK_DIR" --cfg-options "train_dataloader.dataset.data_root=$SYNTH" \
    "val_dataloader.dataset.data_root=$DATA_ROOT" "test_dataloader.dataset.data_root=$DATA_ROOT" "$@"
