#!/usr/bin/env bash
# Create .venv (if missing) and install nanot5 with its test dependencies. Only the package index is
# contacted (no extra indexes are probed). When no torch is installed, NANOT5_TORCH (default torch==2.13.0)
# is installed first; it may carry pip options, e.g. a CPU-only build on a machine without an NVIDIA GPU:
#   NANOT5_TORCH="torch --index-url https://download.pytorch.org/whl/cpu" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086  # word splitting is wanted: the spec may hold pip options
    python -m pip install -q ${NANOT5_TORCH:-torch==2.13.0}
fi
python -m pip install -q -e ".[test]"
