#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, in NANOT5_TEST_WORKERS parallel processes
# (default 2, pytest-xdist; most tests are single-threaded subprocess runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -n "${NANOT5_TEST_WORKERS:-2}" "$@"
