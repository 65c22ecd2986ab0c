#!/usr/bin/env bash
# Refreshes the lock, constraints.txt (issue 28): a fresh venv (.lock-venv), the newest releases
# pyproject.toml's ranges allow, the whole test suite, and only if it passes, the new lock from that
# venv. Raise an upper bound in pyproject.toml first to let a new major / minor in (then say in the
# commit which versions the suite passed on). About 15 minutes on 2 cores.
#   bash scripts/update_lock.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .lock-venv
python3 -m venv .lock-venv
. .lock-venv/bin/activate
python -m pip install -q --upgrade pip
bash scripts/install.sh --dev --latest
export RLHF_FAST_BUILD_DIR="$PWD/.ci-build" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export TORCH_EXTENSIONS_DIR="$PWD/.lock-venv/torch_extensions"  # DeepSpeed's JIT ops per venv (.ci/run says why)
bash scripts/test.sh --installed "$@"
python scripts/dev_requirements.py --freeze > constraints.txt
echo "scripts/update_lock.sh: the suite passed; constraints.txt rewritten (git diff constraints.txt)"
