"""Issue 18's trainer half: the PPO trainer computes its log-probs under the distribution the
sampler draws from (temperature, top-k, top-p), so at any sampling setting the engine's and the
trainer's log-probs agree to float32 rounding and the first minibatch's ratio is exactly 1; with
``ppo.old_logprobs: rollout`` the engine's log-probs are the old ones; settings the sampler cannot
reproduce are config errors naming the field."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_fast import config as C
from rlhf_fast.trainers import ppo_core
from rlhf_fast.trainers.ppo import PPOTrainer
from rlhf_fast.trainers.run.metrics_log import read_metrics

TINY = ["--ppo.logging.progress_bar", "false", "--ppo.logging.tensorboard", "false", "--ppo.policy.size", "test",
        "--ppo.reward.function", "task:gold", "--ppo.iterations", "3", "--ppo.rollout_batch_size", "8",
        "--ppo.generation.max_new_tokens", "8", "--ppo.eval_prompts", "8", "--ppo.logging.eval_every", "0",
        "--ppo.algo.num_minibatches", "2", "--ppo.algo.num_epochs", "2", "--ppo.critic", "value_head",
        "--ppo.optim.lr", "1e-3"]
FILTER = ["--ppo.generation.top_p", "0.9", "--ppo.generation.top_k", "20"]


def _cfg(*extra):
    return C.load_config(overrides=[*TINY, *extra]).ppo


def _train_rows(out):
    return [r for r in read_metrics(out) if "objective/kl" in r]


def test_filtered_sampling_trainer_agrees_and_first_ratio_is_one(tmp_path):
    """top_p 0.9 / top_k 20: every iteration's engine-vs-trainer gap is float32 rounding and the
    first minibatch's approx-KL and clip fraction are exactly 0 (the ISSUE's acceptance run, small)."""
    PPOTrainer(_cfg(*FILTER), tmp_path).fit()
    rows = _train_rows(tmp_path)
    assert len(rows) == 3
    for r in rows:
        assert r["generation/logprob_gap_max"] <= 1e-5, r["generation/logprob_gap_max"]
        assert r["policy/first_minibatch_approxkl"] == 0.0 and r["policy/first_minibatch_clipfrac"] == 0.0
        assert math.isfinite(r["objective/kl"]) and math.isfinite(r["policy/approxkl"])
        assert 0.0 <= r["policy/outside_filter_frac"] < 0.5  # tokens that left the updated top-k / top-p set


def test_unfiltered_log_probs_would_not_agree(tmp_path):
    """The same sampler with the trainer forced onto the full softmax (algo.top_k 0 / top_p 1, what
    every peer does): the gap is far above rounding. This is what the filter fixes."""
    PPOTrainer(_cfg(*FILTER, "--ppo.algo.top_k", "0", "--ppo.algo.top_p", "1.0"), tmp_path).fit()
    assert max(r["generation/logprob_gap_max"] for r in _train_rows(tmp_path)) > 1e-2


def test_old_logprobs_from_the_rollout(tmp_path):
    """The engine's log-probs are the old ones; the recomputation (for the gap) runs only every
    logprob_gap_every iterations; the first ratio is 1 up to the engine / trainer rounding."""
    PPOTrainer(_cfg(*FILTER, "--ppo.old_logprobs", "rollout", "--ppo.logprob_gap_every", "2"), tmp_path).fit()
    rows = _train_rows(tmp_path)
    assert ["generation/logprob_gap_max" in r for r in rows] == [True, False, True]  # iterations 0 and 2
    assert all(r["generation/logprob_gap_max"] <= 1e-5 for r in rows if "generation/logprob_gap_max" in r)
    for r in rows:
        assert r["policy/first_minibatch_approxkl"] < 1e-10 and math.isfinite(r["objective/kl"])


def test_rollout_old_logprobs_skip_the_policy_lm_head():
    """score_logprobs with the engine's log-probs returns them as the old ones, and runs no LM head
    of the policy (counted with a hook), while the values still come from the value head."""
    from rlhf_fast.algos import PRESETS, Rollout
    from rlhf_fast.models import Policy
    from rlhf_fast.tasks import tiny_config

    policy = Policy.from_pretrained(tiny_config("gpt2", vocab_size=40, bos_token_id=1, eos_token_id=2,
                                                pad_token_id=0), value_head=True, seed=0)
    ref = Policy.from_pretrained(tiny_config("gpt2", vocab_size=40, bos_token_id=1, eos_token_id=2,
                                             pad_token_id=0), seed=1)
    g = torch.Generator().manual_seed(0)
    roll = Rollout(torch.randint(3, 40, (4, 3), generator=g), torch.ones(4, 3, dtype=torch.bool),
                   torch.randint(3, 40, (4, 5), generator=g), torch.ones(4, 5, dtype=torch.bool), torch.zeros(4))
    hp = PRESETS["tldr"].replace(num_minibatches=2)
    plan = ppo_core.first_epoch_plan(torch.Generator().manual_seed(1), 4, hp)
    calls = []
    policy.lm_head.register_forward_hook(lambda *a: calls.append(1))
    engine_lp = -torch.rand(4, 5, generator=g)
    lp, _, values = ppo_core.score_logprobs(policy, None, ref, roll, hp, plan=plan, old_logprobs=engine_lp)
    assert torch.equal(lp, engine_lp) and calls == [] and values is not None
    lp2, _, values2 = ppo_core.score_logprobs(policy, None, ref, roll, hp, plan=plan)
    assert calls and torch.equal(values, values2)


def test_reference_outside_its_kept_set_is_named():
    mask = torch.ones(2, 3, dtype=torch.bool)
    ref = torch.tensor([[-1.0, -torch.inf, -2.0], [-1.0, -1.0, -1.0]])
    with pytest.raises(ValueError, match=r"1 of 6 sampled tokens lie outside the reference.*ppo\.algo\.ref_filter"):
        ppo_core._check_reference_support(ref, mask)
    ppo_core._check_reference_support(torch.where(mask, -1.0, -torch.inf), mask)  # padding may be -inf


@pytest.mark.parametrize("extra, message", [
    (["--ppo.algo.ref_filter", "true"], r"ppo\.algo\.ref_filter needs a sampling filter"),
    (["--ppo.generation.top_p", "0.9", "--ppo.algo.temperature", "1.0"], r"ppo\.algo\.temperature \(1\.0\) differs"),
    (["--ppo.old_logprobs", "rollout", "--ppo.algo.temperature", "1.0"], r"ppo\.old_logprobs 'rollout'"),
    (["--ppo.old_logprobs", "rollout", "--ppo.algo.top_k", "5"], r"ppo\.old_logprobs 'rollout'"),
    (["--ppo.algo.top_p", "1.5"], r"top_p"),
    (["--ppo.algo.top_k", "-1"], r"top_k"),
    (["--ppo.generation.top_p", "0"], r"ppo\.generation\.top_p"),
    (["--ppo.generation.top_k", "-3"], r"ppo\.generation\.top_k"),
    (["--ppo.logprob_gap_every", "0"], r"ppo\.logprob_gap_every"),
])
def test_bad_filter_settings_name_the_field(extra, message):
    with pytest.raises(ValueError, match=message):
        _cfg(*extra)
