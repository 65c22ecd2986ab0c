"""Data-parallel PPO: 2 processes (torchrun, gloo, CPU) with ZeRO-2 and with ZeRO-3 against one
process on the same global batch (tests/_ppo_dist_worker.py: greedy rollouts, so every row is the
same whatever rank decodes it).

Tolerance: per-iteration losses and statistics within 1e-4 relative + 1e-5 absolute (gradient
all-reduce and ZeRO partitioning change summation order only); final policy parameters within
1e-5, except Adam's near-zero-gradient entries (attention key biases: the true gradient is 0, so
Adam's lr * sign(noise) step can flip), allowed up to 2 * lr * steps on at most 5% of a tensor.
"""

from __future__ import annotations

import json

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast.models import Policy
from rlhf_fast.trainers.run.metrics_log import read_metrics

WORKER = Path(__file__).with_name("_ppo_dist_worker.py")
LR, STEPS = 1e-3, 2 * 2 * 2  # iterations x epochs x minibatches


def _launch(out: Path, nproc: int, stage: int, linear: bool = False, lora_rank: int = 0, packing=None,
            max_tokens=None, extra=()) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run"]  # this interpreter (a `torchrun` on PATH may be another venv's)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", RLHF_FAST_NO_TQDM="1")
    proc = subprocess.run([*cmd, "--nproc_per_node", str(nproc), "--master_port", str(port), str(WORKER), str(out),
                           str(stage), str(linear).lower(), str(lora_rank),
                           *([] if packing is None else [str(packing).lower()]),
                           *([] if max_tokens is None else [str(max_tokens)]), *(["--", *extra] if extra else [])],
                          capture_output=True, text=True, timeout=600,
                          env=env)
    done = (out / "model" / ("adapter_config.json" if lora_rank else "config.json")).is_file()
    assert proc.returncode == 0 and done, proc.stdout[-3000:] + proc.stderr[-5000:]


def _train_rows(out: Path):
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "time/", "generation/"))}
            for r in read_metrics(out) if "objective/kl" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo1")
    _launch(out, 1, 0)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,linear", [(2, False), (3, False), (3, True)])
def test_two_ranks_match_one(single, tmp_path, stage, linear):
    """(3, True): ZeRO-3 with ``use_linear_logprobs``: the fused op reads ``lm_head.weight``
    outside lm_head's forward, so it runs as ``Policy.fused_head``, with the weight registered
    as that module's external parameter (before this, the weight was an empty shard)."""
    _launch(tmp_path, 2, stage, linear)
    _assert_two_match_one(single, tmp_path, stage)


@pytest.fixture(scope="module")
def single_padded(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo1_padded")
    _launch(out, 1, 0, packing=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,linear,max_tokens", [(2, False, None), (3, True, None), (2, False, 20), (3, False, 20)])
def test_two_ranks_packed_match_one_padded(single_padded, tmp_path, stage, linear, max_tokens):
    """ppo.packing (models/packing.py) under 2-rank ZeRO against the padded single process: the
    same iterations within the same tolerance; with ``algo.max_tokens_per_micro_batch`` the
    micro-batches are cut by tokens (trainers/token_budget.py: DeepSpeed's accumulation boundary set
    by hand)."""
    _launch(tmp_path, 2, stage, linear, packing=True, max_tokens=max_tokens)
    _assert_two_match_one(single_padded, tmp_path, stage)


def _assert_two_match_one(single, tmp_path, stage):
    held = [json.loads((tmp_path / f"ref_params_rank{r}.json").read_text()) for r in (0, 1)]
    if stage == 3:  # ZeRO-3 inference for the frozen reference (ppo.frozen_zero3 defaults on at stage 3)
        assert all(h["held"] < h["full"] for h in held), held
    else:
        assert all(h["held"] == h["full"] for h in held), held
    one, two = _train_rows(single), _train_rows(tmp_path)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]) + 1e-5, (stage, a["step"], k, a[k], b[k])
    p1 = Policy.from_pretrained(single / "model").state_dict()
    p2 = Policy.from_pretrained(tmp_path / "model").state_dict()
    for name, t1 in p1.items():
        diff = (p2[name].float() - t1.float()).abs()
        assert float(diff.max()) <= 2 * LR * STEPS + 1e-5, (name, float(diff.max()))
        assert float((diff > 1e-5).float().mean()) <= 0.05, (name, float((diff > 1e-5).float().mean()))


@pytest.fixture(scope="module")
def single_lora(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo1_lora")
    _launch(out, 1, 0, lora_rank=4)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage,linear", [(0, False), (1, False), (2, True), (3, True)])
def test_two_ranks_match_one_with_lora(single_lora, tmp_path, stage, linear):
    """LoRA policy and critic (docs/architecture.md "LoRA") under ZeRO 0-3: the reference is the
    policy with its adapters disabled at every stage (no storage of its own, no ZeRO-3 inference
    engine for it: only the reward model would get one, and this run scores with a function), and
    two ranks train what one does. With ``use_linear_logprobs`` at stages 2 and 3."""
    _launch(tmp_path, 2, stage, linear, lora_rank=4)
    held = [json.loads((tmp_path / f"ref_params_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(h["ref_own_storages"] == 0 and h["frozen_engines"] == 0 for h in held), held
    if stage == 3:  # the policy's own engine partitions the weights the reference reads
        assert all(h["held"] < h["full"] for h in held), held
    one, two = _train_rows(single_lora), _train_rows(tmp_path)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for k in a:
            assert abs(a[k] - b[k]) <= 1e-4 * abs(a[k]) + 1e-5, (stage, a["step"], k, a[k], b[k])
    assert one[0]["objective/kl"] == 0.0
    p1 = Policy.from_pretrained(single_lora / "model").state_dict()
    p2 = Policy.from_pretrained(tmp_path / "model").state_dict()
    base = Policy.from_pretrained(single_lora / "model" / "base").state_dict()
    assert any(not torch.equal(p1[k], base[k]) for k in p1)  # the adapters moved
    for name, t1 in p1.items():
        diff = (p2[name].float() - t1.float()).abs()
        assert float(diff.max()) <= 2 * LR * STEPS + 1e-5, (name, float(diff.max()))
        assert float((diff > 1e-5).float().mean()) <= 0.05, (name, float((diff > 1e-5).float().mean()))


# the fields the tldr / ppo_max presets set to their sources' semantics (issue 30): groups of 2 rows
# that straddle the ranks (rank r trains minibatch positions r::2), the score one past the stop, one
# gradient clip over policy and critic, the critic at 3x the lr with a fixed head bias; stop tokens the
# greedy tiny policy emits, so the rows' lengths (1 to 6) differ and the groups' token means with them
SOURCE_FIELDS = ("--ppo.algo.loss_group_rows", "2", "--ppo.algo.score_position", "after_stop",
                 "--ppo.algo.joint_grad_clip", "true", "--ppo.critic_lr_ratio", "3", "--ppo.critic_head_bias", "false",
                 "--ppo.generation.stop_tokens", "[' found', ' flat', ' built', ' carried']")


@pytest.mark.slow
def test_two_ranks_match_one_with_the_sources_fields(tmp_path):
    """The loss over groups of rows, the score position and the joint clip do not depend on the
    world size: 2 ranks (ZeRO-0, which the joint clip needs) train what one process does."""
    one, two = tmp_path / "one", tmp_path / "two"
    _launch(one, 1, 0, extra=SOURCE_FIELDS)
    _launch(two, 2, 0, extra=SOURCE_FIELDS)
    _assert_two_match_one(one, two, 0)
