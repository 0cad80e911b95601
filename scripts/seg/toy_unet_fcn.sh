#!/usr/bin/env bash
# Stage 5 (toy): UNet+FCN segmenter on the 32 px toy dataset, evaluated on the real toy val split.
# Hardware: CPU (2 cores). Time: ~3.5 min for the benchmark profile (3000 iterations, batch 32) on a quiet 2-core CPU.
# Needs data/toy: python -m utils.make_toy_dataset --out data/toy --size 32 --num_train 4000 --num_val 500
# Train on generated pairs: TRAIN_ROOT=data/gen/toy (scripts/gen/toy_light.sh); the demo profile runs ITERS=800.
set -euo pipefail
CONFIG=${CONFIG:-configs/seg/toy_unet_fcn.py}
WORK_DIR=${WORK_DIR:-runs/seg/toy_unet_fcn}
TRAIN_ROOT=${TRAIN_ROOT:-data/toy}
ITERS=${ITERS:-3000}
python -m train.segmenter "$CONFIG" --work-dir "$WORK_DIR" \
    --cfg-options train_dataloader.dataset.data_root="$TRAIN_ROOT" train_cfg.max_iters="$ITERS" "$@"
