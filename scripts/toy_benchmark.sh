#!/usr/bin/env bash
# The toy benchmark profile: the demo's chain on the shipped pretrained toy base, sized so every
# model converges, with the DiffuMask baseline on the same base. CPU, 2 cores: <= 60 minutes
# (`--backbones unet uvit` adds the authors' U-ViT beside the UNet, about as long again).
# Report: runs/toy_benchmark/report.md. Rerun to resume; extra flags are forwarded.
# Writes nothing tracked: a maintainer refreshing bench/results/ adds `--publish true`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m bench.toy_benchmark --config configs/toy_benchmark/bench.yaml "$@"
