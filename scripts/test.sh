#!/usr/bin/env bash
# The test suite: installs what it needs into .venv (created if missing), then runs pytest.
# CPU, ~15 min on a fresh machine (install) + the suite. Extra arguments go to pytest, e.g.
#   bash scripts/test.sh tests/test_dataset.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
exec .venv/bin/python -m pytest -q "$@"
