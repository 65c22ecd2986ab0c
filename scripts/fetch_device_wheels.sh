#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored through .git/info/exclude), the wheels the GPU device
# machine lacks (it has no network): deepspeed as a pure-Python wheel, its config deps hjson and
# pydantic (with pydantic-core built for CPython 3.12 / x86-64), and datasets with dill and
# multiprocess. Carry `.whl` in the device `run` call and install with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# (see benchmarks/GPU_SESSION.md). Versions are the ones this project's CI installs.
set -euo pipefail
cd "$(dirname "$0")/.."
info="$(git rev-parse --git-dir)/info" && mkdir -p "$info"
grep -qxF '/.whl/' "$info/exclude" 2>/dev/null || echo '/.whl/' >> "$info/exclude"
rm -rf .whl && mkdir -p .whl
ver() { python -c "import importlib.metadata as m; print(m.version('$1'))"; }
# deepspeed: sdist only on PyPI; build a pure-Python wheel without its deps or op builds
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(ver deepspeed)"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python -m pip download -q --no-deps "${plat[@]}" -d .whl \
  "hjson==$(ver hjson)" "pydantic==$(ver pydantic)" "pydantic-core==$(ver pydantic_core)" \
  "annotated-types==$(ver annotated-types)" "typing-inspection==$(ver typing-inspection)" \
  "datasets==$(ver datasets)" "dill==$(ver dill)" "multiprocess==$(ver multiprocess)"
ls -la .whl
du -sh .whl
