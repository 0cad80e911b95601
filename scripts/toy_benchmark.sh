#!/usr/bin/env bash
# The toy benchmark profile: the demo's chain sized so every model converges, with the widened UNet
# and the authors' U-ViT side by side. CPU, 2 cores: the UNet branch <= 60 minutes, the U-ViT branch
# about as long again, not yet measured (`--backbones unet` for the UNet alone).
# Report: runs/toy_benchmark/report.md. Rerun to resume; extra flags are forwarded.
# Writes nothing tracked: a maintainer refreshing bench/results/ adds `--publish true`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m bench.toy_benchmark --config configs/toy_benchmark/bench.yaml "$@"
