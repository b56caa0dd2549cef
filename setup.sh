#!/usr/bin/env bash
# One command to set up a fresh machine for padt: a virtualenv in .venv with torch, padt and its extras.
#   bash setup.sh            # CPU machine (this kind): torch CPU build, no torchvision, no flash-attn
#   PADT_GPU=1 bash setup.sh # GPU node: the CUDA torch build, torchvision, and the flash-attn extra
# Environment: PADT_VENV (default .venv), PADT_EXTRAS (default "train,eval,demo,dev"), PADT_TORCH (torch spec).
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PADT_VENV:-.venv}
EXTRAS=${PADT_EXTRAS:-train,eval,demo,dev}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "${PADT_GPU:-0}" = "1" ]; then
  # CUDA builds of torch + torchvision, then flash-attn (needs torch at build time).
  "$PY" -m pip install -q "${PADT_TORCH:-torch==2.14.1}" torchvision
  "$PY" -m pip install -q -e ".[$EXTRAS]"
  "$PY" -m pip install -q --no-build-isolation -e ".[flash]" || echo "setup.sh: flash-attn failed to build; padt uses sdpa" >&2
else
  # Pinned first so that no later resolution pulls a multi-GB CUDA build (see ../shared/env-notes.md).
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "${PADT_TORCH:-torch==2.13.0}"
  "$PY" -m pip install -q -e ".[$EXTRAS]"
fi
"$PY" -c "import padt, torch, transformers; print(f'padt {padt.__version__} | torch {torch.__version__} | transformers {transformers.__version__}')"
