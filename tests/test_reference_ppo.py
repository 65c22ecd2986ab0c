"""The reference PPO (rlhf_fast.trainers.parity.ppo_reference) on a tiny model: the ratio is exactly 1 on the first
minibatch of the first epoch, KL is 0 with reference == policy, losses are finite and parameters
move, a higher-advantage response gains log-prob, micro-batching does not change the update,
the same generator gives bit-identical results, and every option runs (critic, KL in loss,
grpo / rloo, per-minibatch whitening, float64)."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_fast.algos import PRESETS, PPOHyperParams, Rollout
from rlhf_fast.models import Critic, Policy, RewardModel
from rlhf_fast.trainers.parity.ppo_reference import ppo_iteration
from rlhf_fast.tasks import tiny_config

V, B, Q, R = 48, 4, 5, 6


def _policy(seed=0, value_head=True):
    return Policy.from_pretrained(tiny_config("gpt2", vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                                  seed=seed, value_head=value_head)


@pytest.fixture(scope="module")
def base():
    policy = _policy()
    with torch.no_grad():  # a non-zero value head, so the value loss and its clipping do something
        policy.value_head.linear.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    return policy


def _rollout(seed=0, scores=(1.0, -1.0, 0.5, 0.0), group_ids=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(3, V, (B, Q), generator=g)
    qm = torch.ones(B, Q, dtype=torch.bool)
    qm[0, :2] = False  # left padding
    q[~qm] = 0
    r = torch.randint(3, V, (B, R), generator=g)
    rm = torch.ones(B, R, dtype=torch.bool)
    rm[1, 4:] = False  # truncated after a stop token
    r[~rm] = 0
    return Rollout(q, qm, r, rm, torch.tensor(scores), group_ids=group_ids)


def _run(base, hp, *, seed=0, lr=1e-3, critic=None, kl_coef=0.05, dtype=torch.float32, rollout=None, ref=None,
         optim=torch.optim.Adam):
    policy = copy.deepcopy(base)
    ref = copy.deepcopy(base).eval() if ref is None else ref
    params = list(policy.parameters()) + (list(critic.parameters()) if critic is not None else [])
    opt = optim(params, lr=lr)
    result = ppo_iteration(policy, ref, rollout or _rollout(), hp, opt, kl_coef=kl_coef,
                           generator=torch.Generator().manual_seed(seed), critic=critic, dtype=dtype)
    return policy, result


def _ratio_is_one(s):
    return s.ratio_mean.item() == 1.0 and s.ratio_max.item() == 1.0 and s.approxkl.item() == 0.0 and s.clipfrac.item() == 0.0


@pytest.mark.parametrize("micro", [None, 1, 3])
def test_ratio_exactly_one_on_first_minibatch_and_kl_zero(base, micro):
    hp = PRESETS["tldr"].replace(num_minibatches=2, micro_batch_size=micro, num_epochs=2)
    policy, res = _run(base, hp)
    assert _ratio_is_one(res.stats.minibatches[0])  # dropout off, one log-prob path (TRL #454)
    assert not _ratio_is_one(res.stats.minibatches[-1])  # it moves afterwards
    assert res.rollout.kl.eq(0).all() and res.stats.objective.kl.item() == 0.0  # reference == policy
    d = res.stats.to_dict()
    assert all(torch.isfinite(torch.tensor(v)) for v in d.values())
    assert {"objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward", "policy/approxkl",
            "policy/clipfrac", "policy/entropy", "val/clipfrac", "val/vpred", "val/error", "policy/ratio_mean",
            "policy/ratio_max", "kl_coef"} <= set(d)
    assert len(res.stats.minibatches) == hp.num_epochs * hp.num_minibatches
    changed = [not torch.equal(a, b) for a, b in zip(policy.parameters(), base.parameters())]
    assert any(changed)


def _response_logprob(policy, rollout, temperature):
    with torch.no_grad():
        lp = policy.logprobs(rollout.sequences, rollout.attention_mask, temperature=temperature,
                             response_start=rollout.response_start).logprobs
    return (lp * rollout.response_mask).sum(-1)


def test_higher_advantage_response_gains_logprob(base):
    rollout = _rollout(scores=(2.0, -2.0, -2.0, 2.0))
    hp = PPOHyperParams(num_epochs=2, num_minibatches=1, vf_coef=0.1, temperature=0.7)
    before = _response_logprob(base, rollout, 0.7)
    policy, res = _run(base, hp, lr=3e-3, kl_coef=0.0, rollout=rollout)
    after = _response_logprob(policy, rollout, 0.7)
    delta = after - before
    assert delta[0] > 0 and delta[3] > 0 and delta[1] < 0 and delta[2] < 0, delta
    assert all(torch.isfinite(s.loss) for s in res.stats.minibatches)


def test_micro_batching_does_not_change_the_update(base):
    hp = PRESETS["tldr"].replace(num_minibatches=1, num_epochs=1)
    # SGD: the step is the gradient itself (Adam's first step, ~lr * sign(g), would amplify
    # float32 rounding in near-zero gradient entries).
    p_full, r_full = _run(base, hp, dtype=torch.float64, optim=torch.optim.SGD, lr=1.0)
    p_micro, r_micro = _run(base, hp.replace(micro_batch_size=1), dtype=torch.float64, optim=torch.optim.SGD, lr=1.0)
    moved = 0.0
    for a, b, c in zip(p_full.parameters(), p_micro.parameters(), base.parameters()):
        torch.testing.assert_close(a - c, b - c, rtol=1e-4, atol=1e-6)
        moved = max(moved, float((a - c).detach().abs().max()))
    assert moved > 1e-3
    torch.testing.assert_close(r_full.stats.minibatches[0].loss, r_micro.stats.minibatches[0].loss)


def test_determinism_bit_identical(base):
    hp = PRESETS["lm_human_preferences"].replace(num_minibatches=2, micro_batch_size=1)
    p1, r1 = _run(base, hp, seed=5)
    p2, r2 = _run(base, hp, seed=5)
    assert r1.stats.to_dict() == r2.stats.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(p1.parameters(), p2.parameters()))
    _, r3 = _run(base, hp, seed=6)  # another permutation: other minibatches
    assert r3.stats.to_dict() != r1.stats.to_dict()


def test_kl_nonzero_with_other_reference_and_kl_in_loss(base):
    other = _policy(seed=1).eval()
    hp = PPOHyperParams(kl_placement="in_loss", kl_estimator="k3", num_epochs=1, ent_coef=0.01)
    _, res = _run(base, hp, ref=other)
    s = res.stats
    assert s.objective.kl.item() != 0.0 and s.minibatches[0].kl_loss.item() > 0  # k3 >= 0
    # KL in the loss: the rewards carry the score only
    ro = res.rollout
    assert torch.equal(ro.rewards.sum(-1), ro.scores)


def test_separate_critic_and_per_minibatch_whitening(base):
    rm = RewardModel.from_pretrained(tiny_config("gpt2", vocab_size=V), new_head=True, seed=7)
    critic = Critic.from_reward_model(rm)
    policy0 = _policy(value_head=False)
    hp = PRESETS["lm_human_preferences"].replace(num_minibatches=2, num_epochs=1)
    _, res = _run(policy0, hp, critic=critic)
    assert _ratio_is_one(res.stats.minibatches[0])
    assert all(torch.isfinite(s.loss) and s.vpred.item() != 0 for s in res.stats.minibatches)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_without_critic(estimator):
    policy0 = _policy(value_head=False)
    rollout = _rollout(group_ids=torch.tensor([0, 0, 1, 1]))
    hp = PPOHyperParams(advantage_estimator=estimator, kl_placement="in_loss", num_epochs=1)
    _, res = _run(policy0, hp, rollout=rollout)
    adv = res.rollout.advantages
    assert adv[~rollout.response_mask].eq(0).all() and torch.isfinite(res.stats.minibatches[0].loss)
    assert res.stats.minibatches[0].value_loss.item() == 0.0


def test_float64_math_and_bad_batch(base):
    hp = PRESETS["ppo_max"].replace(num_minibatches=2)
    _, res = _run(base, hp, dtype=torch.float64)
    assert res.rollout.advantages.dtype == torch.float64
    with pytest.raises(ValueError, match="divisible"):
        _run(base, hp.replace(num_minibatches=3))
