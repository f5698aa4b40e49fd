#!/usr/bin/env bash
# Create .venv (if missing) and install nanot5 with its test dependencies.
# torch is pinned to a CPU build when none is installed: a bare `pip install torch`
# may pull a multi-GB CUDA build. Set NANOT5_TORCH to choose another spec.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install -q "${NANOT5_TORCH:-torch==2.13.0}"
fi
python -m pip install -q -e ".[test]"
