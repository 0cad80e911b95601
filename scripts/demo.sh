#!/usr/bin/env bash
# The main job on the built-in toy default: toy dataset -> label VAE -> tiny base model ->
# joint diffusion -> generation -> mask optimization -> DiffuMask baseline -> mmseg segmenters,
# and a report. CPU, 2 cores: ~10 minutes, within 15 with a first-time install (pip cache warm).
# Rerun to resume an interrupted run; extra flags go to bench.toy_benchmark (e.g. --output_dir).
# Writes only under runs/demo (no tracked file).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m bench.toy_benchmark --config configs/toy_benchmark/demo.yaml "$@"
