#!/usr/bin/env bash
# The main job on a fresh machine: install rlhf_fast (and a CPU torch if there is no torch), then
# run SFT -> reward model -> PPO on the built-in task (nothing is downloaded) and print a summary.
#   bash scripts/quickstart.sh                       # writes runs/quickstart
#   bash scripts/quickstart.sh --preset ci           # the 1-minute variant CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import rlhf_fast, deepspeed" 2>/dev/null; then
  # torch first and pinned when absent: an unpinned resolve pulls GBs of CUDA packages.
  python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q -e .
fi
exec rlhf-fast pipeline --output-dir runs/quickstart "$@"
