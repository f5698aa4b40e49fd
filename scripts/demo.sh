#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on its default: `nanot5 pretrain preset=demo`, the offline demo
# (builds the demo corpus and tokenizer on first use, pre-trains a small T5, evaluates, plots).
# Extra arguments are key=value overrides, e.g. `bash scripts/demo.sh optim.total_steps=100`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/nanot5 pretrain preset=demo "$@"
