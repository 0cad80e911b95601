#!/usr/bin/env bash
# Install everything into .venv (created if missing). Idempotent: a second run checks and returns.
# CPU machine, Python 3.11. First run about 15 minutes (mmcv's compiled ops build from source
# on 2 cores takes ~11 of them; pip caches the wheel, so later installs take seconds).
# GPU machines: see the README (CUDA torch first, mmcv from OpenMMLab's wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.jodiffusion-installed-$(cat requirements.txt requirements-mm.txt scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && "$PY" -c "import torch, diffusers, mmcv._ext, mmseg, mmdet" >/dev/null 2>&1; then
  echo "[install] $VENV is up to date"
  exit 0
fi

"$PY" -m pip install -q --upgrade pip 'setuptools<82' wheel ninja
echo "[install] core requirements (torch 2.13.0 CPU, diffusers, transformers, accelerate, ...)"
"$PY" -m pip install -q -r requirements.txt
if ! "$PY" -c "import mmcv._ext" >/dev/null 2>&1; then
  echo "[install] mmcv 2.1.0 with compiled ops (built from source, ~11 min on 2 cores the first time)"
  # Without --no-build-isolation the build "succeeds" but ships no compiled ops (mmcv._ext).
  MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation mmcv==2.1.0
fi
echo "[install] OpenMMLab set (mmengine, mmsegmentation, mmdet) and data-preparation extras"
"$PY" -m pip install -q -r requirements-mm.txt
"$PY" -c "import mmcv._ext, mmseg, mmdet" || { echo "[install] error: mmcv was installed without its compiled ops (mmcv._ext)"; exit 1; }
touch "$stamp"
echo "[install] done: $($PY -c 'import torch, diffusers, mmseg; print("torch", torch.__version__, "| diffusers", diffusers.__version__, "| mmseg", mmseg.__version__)')"
