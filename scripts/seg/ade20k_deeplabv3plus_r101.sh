#!/usr/bin/env bash
# Stage 5: deeplabv3plus_r101 trained on generated ade20k pairs, evaluated on the real ade20k val split (mmseg).
# Hardware: GPUS x 1 GPU (>= 24 GB), batch 4 per GPU (recipe: 4 GPUs = batch 16). Time: ~1 day (80k iters)
# on 4 A100s. Real data_root: dataset/ade20k_semantic.py.
# Real + synthetic: CONFIG=configs/seg/ade20k_deeplabv3plus_r101_mix.py (then the synthetic
# folder is --cfg-options train_dataloader.dataset.datasets.0.data_root=DIR).
# Extra flags go to train.segmenter, e.g. the generated folder:
#   --cfg-options train_dataloader.dataset.data_root=DIR (default data/synthetic/<dataset>),
# --resume, --eval-only --checkpoint FILE,
# --cfg-options model.backbone.init_cfg.type=Pretrained model.backbone.init_cfg.checkpoint=PATH
set -euo pipefail
GPUS=${GPUS:-4}
CONFIG=${CONFIG:-configs/seg/ade20k_deeplabv3plus_r101_synthetic.py}
WORK_DIR=${WORK_DIR:-runs/seg/ade20k_deeplabv3plus_r101}
torchrun --nproc_per_node="$GPUS" --master_port="${PORT:-29500}" -m train.segmenter "$CONFIG" \
    --launcher pytorch --work-dir "$WORK_DIR" "$@"
