#!/usr/bin/env bash
# The main job on a fresh machine: install rlhf_fast at the lock's versions (constraints.txt; and a
# CPU torch if there is no torch: scripts/install.sh), then run SFT -> reward model -> PPO on the
# built-in task (nothing is downloaded) and print a summary.
#   bash scripts/quickstart.sh                       # writes runs/quickstart
#   bash scripts/quickstart.sh --preset ci           # the 1-minute variant CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
# installed (importable from outside the checkout, with its command) or not: install it
{ (cd / && python -c "import rlhf_fast, deepspeed") 2>/dev/null && command -v rlhf-fast >/dev/null; } || bash scripts/install.sh
exec rlhf-fast pipeline --output-dir runs/quickstart "$@"
