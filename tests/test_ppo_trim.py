"""``ppo.algo.trim_padding`` (rlhf_fast/trainers/ppo_trim.py): the PPO forwards run on the columns
a micro-batch's rows attend to. The forward is the same math; its float32 bits are the same when
the kept length is rounded up to 16 (the CPU attention kernel's summation is then unchanged), and
the update's gradients (weight-gradient GEMMs summing over fewer zero rows) stay within the
numerical contract of docs/architecture.md."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from rlhf_fast.algos import PRESETS, Rollout, RunningMoments
from rlhf_fast.models import Critic, Policy
from rlhf_fast.tasks import tiny_config
from rlhf_fast.testing import assert_no_worse_than_baseline
from rlhf_fast.trainers import ppo_core, ppo_trim

V, Q, R = 61, 5, 40


def _models(dtype=torch.float32):
    cfg = tiny_config("llama", vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    policy = Policy.from_pretrained(cfg, seed=0, dtype=dtype)
    critic = Critic(copy.deepcopy(policy.backbone)).to(dtype)
    with torch.no_grad():
        critic.value_head.linear.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    return policy, critic


def _rollout(B, max_len=13, seed=0):
    """Left-padded prompts (the first column padding in every row), responses of 1..max_len tokens in R."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(3, V, (B, Q), generator=g)
    qm = torch.arange(Q) >= torch.randint(1, Q - 1, (B,), generator=g)[:, None]
    q[~qm] = 0
    r = torch.randint(3, V, (B, R), generator=g)
    rm = torch.arange(R) < torch.randint(1, max_len + 1, (B,), generator=g)[:, None]
    r[~rm] = 0
    return Rollout(q, qm, r, rm, torch.randn(B, generator=g))


def test_trim_padding_drops_only_columns_no_row_attends():
    batch = _rollout(6)
    t = ppo_trim.trim_padding(batch)
    last = int(batch.response_mask.any(0).nonzero().max()) + 1
    first = int(batch.query_mask.any(0).nonzero().min())
    assert first == 1 and last <= 13
    assert t.response_ids.shape == (6, last) and t.query_ids.shape == (6, Q - first)
    assert torch.equal(t.sequences, batch.sequences[:, first : Q + last])
    assert torch.equal(t.attention_mask, batch.attention_mask[:, first : Q + last])
    assert int(t.attention_mask.sum()) == int(batch.attention_mask.sum())
    r16 = ppo_trim.trim_padding(batch, multiple=16)
    assert r16.sequences.shape[1] % 16 == 0 and r16.sequences.shape[1] >= t.sequences.shape[1]
    full = batch.replace(response_mask=torch.ones(6, R, dtype=torch.bool))
    assert ppo_trim.trim_padding(full.replace(query_mask=torch.ones(6, Q, dtype=torch.bool))) is not None
    assert ppo_trim.trim_padding(full).response_ids.shape[1] == R  # nothing to drop at the end
    empty = batch.replace(response_mask=torch.zeros(6, R, dtype=torch.bool))
    assert ppo_trim.trim_padding(empty).response_ids.shape[1] == 1
    x = torch.randn(6, last, requires_grad=True)
    y = ppo_trim.pad_response(x, R)
    assert y.shape == (6, R) and torch.equal(y[:, last:], torch.zeros(6, R - last))


def test_forwards_see_the_trimmed_width_and_give_the_same_bits(monkeypatch):
    """Rounded to 16 columns the trimmed forward's log-probs, entropy and values equal the
    untrimmed ones bit for bit on every response token (an off-by-one in the slicing or the
    response start could not pass), and the models see fewer columns than Q + R."""
    policy, critic = _models()
    batch = _rollout(8)
    hp = PRESETS["tldr"].replace(temperature=0.7)
    seen = []
    policy.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    full = ppo_core.policy_forward(policy, critic, batch, hp.replace(trim_padding=False), entropy=True)
    monkeypatch.setattr(ppo_core, "trim_padding", functools.partial(ppo_trim.trim_padding, multiple=16))
    trimmed = ppo_core.policy_forward(policy, critic, batch, hp, entropy=True)
    assert seen == [Q + R, 16]
    m = batch.response_mask
    for a, b in zip(full, trimmed):
        assert a.shape == b.shape == (8, R)
        assert torch.equal(torch.where(m, a, 0.0), torch.where(m, b, 0.0))
    ref_full = ppo_core.ref_forward(policy, batch, hp.replace(trim_padding=False))
    ref_trim = ppo_core.ref_forward(policy, batch, hp)
    assert torch.equal(ref_full, ref_trim)  # 0 on padded targets either way


def _update(policy, critic, batch, hp, *, dtype=torch.float32):
    """One PPO iteration (experience + 1 epoch of 2 minibatches), plain Adam; returns the stats and
    the updated parameters of both models."""
    policy, critic = copy.deepcopy(policy).to(dtype), copy.deepcopy(critic).to(dtype)
    ref = copy.deepcopy(policy).eval()
    gen = torch.Generator().manual_seed(0)
    plan = ppo_core.first_epoch_plan(gen, batch.batch_size, hp)
    lp, ref_lp, values = ppo_core.score_logprobs(policy, critic, ref, batch, hp, plan=plan)
    exp = ppo_core.finish_experience(batch.replace(logprobs=lp, ref_logprobs=ref_lp, values=values), hp, kl_coef=0.05,
                                     score_stats=RunningMoments())
    steppers = [ppo_core.TorchStepper(m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in (policy, critic)]
    stats = ppo_core.ppo_update(steppers[0], exp, hp, kl_coef=0.05, generator=gen, critic_st=steppers[1])
    params = torch.cat([p.detach().double().flatten() for m in (policy, critic) for p in m.parameters()])
    return stats, params, exp


def test_update_with_trimming_stays_within_the_numerical_contract():
    """The trimmed update's parameters against the float64 untrimmed update (oracle): no worse than
    twice the float32 untrimmed update's error (baseline). The experience (old / reference
    log-probs, values, advantages) is that of the untrimmed forwards to the same contract, and the
    first minibatch's ratio stays exactly 1."""
    policy, critic = _models()
    batch = _rollout(8)
    hp = PRESETS["tldr"].replace(temperature=0.7, num_epochs=1, num_minibatches=2, micro_batch_size=2)
    s_base, p_base, e_base = _update(policy, critic, batch, hp.replace(trim_padding=False))
    s_orac, p_orac, e_orac = _update(policy, critic, batch, hp.replace(trim_padding=False), dtype=torch.float64)
    s_trim, p_trim, e_trim = _update(policy, critic, batch, hp)
    assert not torch.equal(p_base, p_orac)
    assert_no_worse_than_baseline("updated parameters", p_trim, p_orac, p_base, atol=1e-7)
    m = batch.response_mask
    for k in ("logprobs", "ref_logprobs", "values", "advantages"):
        cand, orac, base = (torch.where(m, getattr(e, k), 0.0) for e in (e_trim, e_orac, e_base))
        assert_no_worse_than_baseline(k, cand, orac, base, atol=1e-6)
    first = s_trim[0]
    assert float(first.ratio_max) == 1.0 and float(first.approxkl) == 0.0 and float(first.clipfrac) == 0.0
    for a, b in zip(s_trim, s_base):
        assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-5, abs=1e-7)


def test_reward_model_scores_on_the_attended_columns():
    """``Scorer(trim_padding=True)`` runs each reward-model batch without its all-padding columns:
    the reward model sees fewer columns and the scores are the untrimmed ones to the contract
    (float64 untrimmed oracle, float32 untrimmed baseline)."""
    from types import SimpleNamespace

    from rlhf_fast.models import RewardModel
    from rlhf_fast.trainers.rollout import Scorer

    cfg = tiny_config("llama", vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    rm = RewardModel.from_pretrained(cfg, new_head=True, seed=1).eval()
    b = _rollout(10)
    r = SimpleNamespace(query_ids=b.query_ids, query_mask=b.query_mask, score_ids=b.response_ids,
                        score_mask=b.response_mask, response_ids=b.response_ids)
    seen = []
    hook = rm.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]),
                                                 with_kwargs=True)
    trimmed = Scorer(reward_model=rm, tokenizer=None, batch_size=4, trim_padding=True)(r, [""] * 10)
    base = Scorer(reward_model=rm, tokenizer=None, batch_size=4)(r, [""] * 10)
    hook.remove()
    assert max(seen[:3]) < Q + R and seen[3:] == [Q + R] * 3
    oracle = Scorer(reward_model=copy.deepcopy(rm).double(), tokenizer=None, batch_size=4)(r, [""] * 10)
    assert_no_worse_than_baseline("scores", trimmed, oracle, base, atol=1e-6)
