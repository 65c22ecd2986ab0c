#!/usr/bin/env bash
# The test command: unit, property, parity and distributed tests, then every benchmark once
# as a test (--benchmark-disable) so they cannot rot. Installs the package if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import rlhf_fast, hypothesis, pytest_benchmark" 2>/dev/null; then
  # torch first and pinned when absent (an unpinned resolve pulls GBs of CUDA packages); an
  # installed torch (CPU or CUDA) is kept.
  python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
  python -m pip install -q -e ".[dev]"
fi
python -m pytest tests benchmarks --benchmark-disable -q -p no:cacheprovider "$@"
