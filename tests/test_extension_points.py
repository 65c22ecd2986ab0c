"""Each variation point takes a new variant from a test file: one definition plus one registry
line, no edit of the trainer or the config (docs/architecture.md, "Variation points"; issue 29).
Here: a policy wrapper, a policy loss, an lr schedule and a critic layout, all in one short PPO
run; the generation backend, the decoder and the advantage estimator are added from
``tests/test_generation_backends.py``, ``tests/test_engine_generator.py`` and
``tests/test_ppo_parity.py``. The KL estimators are one table the Python, Triton and C++ backends
are each held to (``tests/test_rlmath_ops.py``, ``tests/test_cpu_isa_rlmath.py``)."""

from __future__ import annotations

import math

import pytest

from rlhf_fast import algos
from rlhf_fast import config as C
from rlhf_fast.algos import schedules
from rlhf_fast.models import Policy
from rlhf_fast.models.layouts import CRITIC_LAYOUTS, CriticLayout
from rlhf_fast.models.wrappers import POLICY_WRAPPERS, PolicyWrapperType
from rlhf_fast.trainers.ppo import PPOTrainer
from rlhf_fast.trainers.run.metrics_log import read_metrics

CALLS = {"logprobs": 0, "loss": 0}


class CountingPolicy(Policy):
    """A policy wrapper of a test: ``Policy`` that counts its log-prob forwards."""

    def logprobs(self, *args, **kwargs):
        CALLS["logprobs"] += 1
        return super().logprobs(*args, **kwargs)


def counting_clip_loss(*args, **kwargs):
    CALLS["loss"] += 1
    return algos.POLICY_LOSSES["ppo_clip"](*args, **kwargs)


@pytest.mark.slow
def test_new_variants_from_a_test_file(tmp_path, monkeypatch):
    monkeypatch.setitem(POLICY_WRAPPERS._items, "counting",
                        PolicyWrapperType(load=CountingPolicy.from_pretrained, wrap=CountingPolicy))
    monkeypatch.setitem(algos.POLICY_LOSSES._items, "counting_clip", counting_clip_loss)
    monkeypatch.setitem(schedules.LR_SCHEDULES._items, "half", lambda step, total, warmup, min_ratio: 0.5)
    monkeypatch.setitem(CRITIC_LAYOUTS._items, "shared_head", CriticLayout(value_head=True, separate=False))
    CALLS.update(logprobs=0, loss=0)
    cfg = C.load_config(overrides=[
        "--ppo.logging.progress_bar", "false", "--ppo.logging.tensorboard", "false", "--ppo.policy.size", "test",
        "--ppo.reward.function", "task:gold", "--ppo.iterations", "2", "--ppo.rollout_batch_size", "8",
        "--ppo.generation.max_new_tokens", "6", "--ppo.eval_prompts", "8", "--ppo.logging.eval_every", "0",
        "--ppo.algo.num_minibatches", "2", "--ppo.algo.num_epochs", "1", "--ppo.optim.lr", "1e-3",
        "--ppo.policy_wrapper", "counting", "--ppo.algo.policy_loss", "counting_clip",
        "--ppo.scheduler.decay", "half", "--ppo.critic", "shared_head"]).ppo
    trainer = PPOTrainer(cfg, tmp_path)
    trainer.fit()
    assert isinstance(trainer.policy_engine.module, CountingPolicy) and isinstance(trainer.ref_policy, CountingPolicy)
    assert trainer.policy_engine.module.value_head is not None and trainer.critic_engine is None  # the layout's say
    assert CALLS["logprobs"] > 0 and CALLS["loss"] == cfg.iterations * 2  # 2 minibatches x 1 epoch per iteration
    rows = [r for r in read_metrics(tmp_path) if "objective/kl" in r]
    assert [r["train/lr"] for r in rows] == pytest.approx([0.5e-3, 0.5e-3], rel=1e-6)
    assert all(math.isfinite(r["policy/approxkl"]) and math.isfinite(r["val/error"]) for r in rows)


def test_unknown_variants_are_named():
    for field, value, first in [("--ppo.policy_wrapper", "mine", "policy"),
                                ("--ppo.scheduler.decay", "step", "linear"),
                                ("--ppo.critic", "both", "value_head"),
                                ("--ppo.deepspeed.dtype", "fp8", "fp32"),
                                ("--rm.normalization", "zscore", "policy_samples"),
                                ("--ppo.old_logprobs", "cache", "recompute"),
                                ("--ppo.generation.after_stop", "kept", "masked")]:
        with pytest.raises(ValueError, match=rf"{field[2:]}: expected one of '{first}', .*got '{value}'"):
            C.load_config(overrides=[field, value])
    with pytest.raises(ValueError, match=r"policy_wrapper: expected one of 'policy', got 'mine'"):
        C.load_config(overrides=["--ppo.policy_wrapper", "mine"])  # a single name reads as a list of one
