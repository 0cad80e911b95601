#!/usr/bin/env bash
# Toy "pretrained" base model (CPU, 2 cores, ~2-3 minutes with configs/toy_base_model/toy.yaml;
# CONFIG=configs/toy_base_model/toy_bench.yaml for the benchmark, ~6-8 minutes): trains the tiny
# image VAE on data/toy and writes an SD-layout folder (unet/ vae/ text_encoder/ tokenizer/ ...).
# Needs data/toy (python -m utils.make_toy_dataset --out data/toy --size 32 ...).
set -euo pipefail
CONFIG=${CONFIG:-configs/toy_base_model/toy.yaml}
DATA_ROOT=${DATA_ROOT:-data/toy}
OUTPUT_DIR=${OUTPUT_DIR:-runs/toy/base_model}
python -m train.toy_base_model --config "$CONFIG" --data_root "$DATA_ROOT" --output_dir "$OUTPUT_DIR" "$@"
