#!/usr/bin/env bash
# The one install routine (issue 28), used by scripts/quickstart.sh, scripts/test.sh and .ci/run:
# torch first and pinned when absent (an unpinned resolve pulls GBs of CUDA packages; an installed
# torch, CPU or CUDA, is kept and pinned to itself), then this checkout, editable, with
#   (default)  the lock: constraints.txt, the exact versions the test suite last passed with;
#   --latest   the newest releases pyproject.toml's ranges allow (to find a drift on purpose);
#   --lowest   the lower bound of each direct dependency's range (uv's "lowest-direct").
# --dev adds the dev extra (tests, benchmarks, triton). The lock holds for the Python minor version
# its header names; another Python gets the newest releases in range, with a warning.
#   bash scripts/install.sh [--dev] [--latest | --lowest]
set -euo pipefail
cd "$(dirname "$0")/.."
extra="" mode=lock
for arg in "$@"; do
  case "$arg" in
    --dev) extra="[dev]" ;;
    --latest|--lowest) mode="${arg#--}" ;;
    *) echo "scripts/install.sh: unknown option '$arg' (--dev, --latest, --lowest)" >&2; exit 2 ;;
  esac
done
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
constraints=$(mktemp "${TMPDIR:-/tmp}/rlhf_fast-constraints.XXXXXX")
trap 'rm -f "$constraints"' EXIT
python scripts/dev_requirements.py --constraints "$mode" "$constraints"
upgrade=()
[ "$mode" = lock ] || upgrade=(--upgrade --upgrade-strategy eager)
python -m pip install -q "${upgrade[@]}" -c "$constraints" -e ".$extra"
