#!/usr/bin/env bash
# The test command: unit, property, parity and distributed tests, then every benchmark once
# as a test (--benchmark-disable) so they cannot rot.
#   bash scripts/test.sh [--latest | --lowest | --installed] [pytest arguments]
# Versions (issue 28), installed through scripts/install.sh:
#   (default)    the lock, constraints.txt: every dependency and dev extra of pyproject.toml and this
#                checkout are checked (scripts/dev_requirements.py --lock), and anything missing or at
#                another version than the lock is installed at the lock's version;
#   --latest     first installs the newest releases pyproject's ranges allow, so a drift is found on
#                purpose, not by a new user (`bash .ci/run --latest` does it in a fresh venv);
#   --lowest     first installs the lowest version each range allows;
#   --installed  runs with what is installed when it is within pyproject's ranges (installs the
#                lock only for what is missing or out of range).
# An installed torch is always kept.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=lock
case "${1:-}" in
  --latest|--lowest|--installed) mode="${1#--}"; shift ;;
esac
case "$mode" in
  latest|lowest) bash scripts/install.sh --dev "--$mode" ;;
  *)
    check=(--lock)
    [ "$mode" = installed ] && check=()
    if ! missing=$(python scripts/dev_requirements.py "${check[@]}"); then
      echo "scripts/test.sh: installing .[dev] at the lock's versions; missing or other: $(echo "$missing" | paste -sd ';' -)" >&2
      bash scripts/install.sh --dev
    fi ;;
esac
python scripts/dev_requirements.py --versions >&2
python -m pytest tests benchmarks --benchmark-disable -q -p no:cacheprovider "$@"
