#!/usr/bin/env bash
# The main job on the built-in toy default, the paper's chain on the shipped pretrained toy base
# (assets/toy_base): toy dataset -> label VAE -> weight init from the base -> joint fine-tune ->
# generation -> mask optimization -> mmseg segmenters, and a report (runs/demo/report.md).
# CPU, 2 cores: the chain took 15.1 min on 2026-12-01, a day this machine ran 1.8x slower than its
# reference (~8.5 min at reference speed), plus a first-time install.
# Rerun to resume an interrupted run; extra flags go to bench.toy_benchmark (e.g. --output_dir).
# Writes only under runs/demo (no tracked file).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m bench.toy_benchmark --config configs/toy_benchmark/demo.yaml "$@"
