#!/usr/bin/env bash
# The test command: unit, property, parity and distributed tests, then every benchmark once
# as a test (--benchmark-disable) so they cannot rot. Installs what the tests need whenever any
# of it is missing: every dependency and dev extra of pyproject.toml, checked by version
# (scripts/dev_requirements.py), and this checkout itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! missing=$(python scripts/dev_requirements.py); then
  echo "scripts/test.sh: installing .[dev]; missing: $(echo "$missing" | paste -sd ';' -)" >&2
  # torch first and pinned when absent (an unpinned resolve pulls GBs of CUDA packages); an
  # installed torch (CPU or CUDA) is kept.
  python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[dev]"
fi
python -m pytest tests benchmarks --benchmark-disable -q -p no:cacheprovider "$@"
