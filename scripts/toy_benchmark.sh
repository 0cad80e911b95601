#!/usr/bin/env bash
# The toy benchmark profile: the demo's chain sized so every model converges. CPU, <= 60 minutes
# on 2 cores. Report: runs/toy_benchmark/report.md. Rerun to resume; extra flags are forwarded.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m bench.toy_benchmark --config configs/toy_benchmark/bench.yaml "$@"
