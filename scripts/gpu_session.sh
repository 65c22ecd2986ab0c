#!/usr/bin/env bash
# Runs ON the GPU device machine (see benchmarks/GPU_SESSION.md), one stage per `run` call,
# each well inside the tool's 10-minute command limit; the machine stays warm between calls
# that follow at once, so the install of stage `tests` serves the later stages.
#   bash scripts/gpu_session.sh tests     # install, GPU tests (Triton kernels natively, engine)
#   bash scripts/gpu_session.sh kernels   # benchmarks: logprob, linear_logprob, rlmath
#   bash scripts/gpu_session.sh e2e       # benchmarks: generate, ppo
# What comes back: logs and one tarball of the new CUDA records under $OUT (at most 8 files).
set -o pipefail
export PYTHONUNBUFFERED=1
stage=${1:?usage: gpu_session.sh tests|kernels|e2e}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then  # deepspeed, pydantic, datasets ... (scripts/fetch_device_wheels.sh)
  [ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
(cd / && python3 -c "import rlhf_fast.kernels") 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
records() { tar czf "$OUT/records_$stage.tgz" $(ls benchmarks/results/*cuda* 2>/dev/null) 2>/dev/null; ls -la "$OUT"; }
case "$stage" in
  tests)
    { nvidia-smi; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"; } \
      2>&1 | tee "$OUT/device.txt"
    timeout 540 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_gpu.py tests/test_gather_logprobs.py \
      tests/test_linear_logprobs.py tests/test_rlmath_triton.py tests/test_rlmath_ops.py tests/test_engine.py \
      tests/test_engine_static.py tests/test_triton_aot.py -m "not slow" 2>&1 | tee "$OUT/gpu_tests.log"
    ;;
  kernels)
    timeout 560 python3 benchmarks/run_all.py --only logprob linear_logprob rlmath sampling 2>&1 | tee "$OUT/bench_kernels.log"
    records ;;
  e2e)
    timeout 560 python3 benchmarks/run_all.py --only generate ppo 2>&1 | tee "$OUT/bench_e2e.log"
    records ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
