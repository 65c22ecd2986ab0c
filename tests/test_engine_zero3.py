"""HybridEngine under DeepSpeed ZeRO-3 on 2 CPU ranks (torchrun, gloo); the checks live in
tests/_engine_zero3_worker.py (see its docstring)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_engine_zero3_worker.py")


@pytest.mark.slow
def test_zero3_rollouts_gather_once_and_training_continues(tmp_path):
    pytest.importorskip("deepspeed")
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    out = tmp_path / "summary.json"
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [*cmd, "--nproc_per_node", "2", "--master_port", "29517", str(WORKER), str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["greedy_equal"] and summary["sampled_equal"], summary
    assert summary["fetches_during_generate"] == 0, summary  # no per-module ZeRO fetch while decoding
    assert summary["gather_enters_per_generate"] == 1 and summary["engine_gathers"] == 1, summary
    assert summary["params_still_partitioned"], summary
    assert summary["max_param_change"] > 0 and summary["after_step_equal"] and summary["after_step_changed"], summary
    assert summary["ok"] and proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
