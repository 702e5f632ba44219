#!/usr/bin/env bash
# Create .venv and install openmill into it (editable), once per change of pyproject.toml.
#   scripts/setup_env.sh [extras]      e.g. scripts/setup_env.sh dev
# A system Python that already has a CUDA build of torch is reused as is (the venv sees the
# system site-packages); otherwise the CPU wheel torch==2.13.0 is pinned, because an unpinned
# torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
VENV=.venv
STAMP="$VENV/.installed${EXTRAS:+-$EXTRAS}"
PYTHON="${PYTHON:-python3}"

if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml ]]; then
    exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    if "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "setup: reusing the system's CUDA torch"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # Plain PyPI serves Linux x86_64 torch with its CUDA libraries; TORCH_INDEX_URL (e.g.
    # https://download.pytorch.org/whl/cpu) picks the CPU-only wheel from PyTorch's own index.
    echo "setup: installing torch==2.13.0 (CPU)${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
    "$VENV/bin/python" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
fi
echo "setup: installing openmill${EXTRAS:+[$EXTRAS]}"
"$VENV/bin/python" -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
touch "$STAMP"
