#!/usr/bin/env bash
# Issue 23's CPU records in one go, on a quiet machine: the kernels at the host's ISA and at AVX2,
# a stage under contention, and one PPO iteration against the real TRL PPOTrainer (needs the TRL
# venv of benchmarks/PEERS.md; skipped with a message otherwise). Records land in
# benchmarks/results/ (one table per ISA in benchmarks/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python benchmarks/run_all.py --only logprob rlmath
python benchmarks/run_all.py --isa avx2 --only rlmath
# torch.compile's bf16 kernel (the dschat_compile baseline) segfaults inside inductor's generated code
# when ATEN_CPU_CAPABILITY=avx2 on an AVX-512 host (torch 2.13, 2026-12-02): AVX2 runs skip it.
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/bench_logprob.py --no-compile
python benchmarks/bench_contention.py
if [ -x "${TRL_PYTHON:-/work/trlvenv/bin/python}" ]; then
  python benchmarks/peer_trl_ppo.py --batch 64 --resp-len 48 --minibatches 2 --epochs 4 --threads 1
  # both sides at bf16 (TRL's default precision): only meaningful where the CPU has native bf16 matmuls
  if python -c "import sys, torch; sys.exit(0 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else 1)"; then
    python benchmarks/peer_trl_ppo.py --batch 64 --resp-len 48 --minibatches 2 --epochs 4 --threads 1 --precision bf16 \
      --replica-reps 0
  fi
else
  echo "cpu_records.sh: no TRL venv (benchmarks/PEERS.md says how to make one): peer_trl_ppo skipped"
fi
python benchmarks/run_all.py --table-only
