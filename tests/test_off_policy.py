"""The asynchronous rollouts' off-policy correction (``rlhf_fast.algos.off_policy``) against its
float64 reference (``rlhf_fast.reference.off_policy``): importance weights by hand on 1 x 4 cases,
then hypothesis over shapes, masks, staleness scales and caps; the decoupled PPO loss (the
registered clipped loss fed ``w * A``) against the objective written out token by token, values and
gradients; staleness 0 gives weights exactly 1 and the synchronous loss bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, note
from hypothesis import strategies as st

from rlhf_fast import algos
from rlhf_fast.algos.off_policy import (
    OFF_POLICY_CORRECTIONS, WeightStats, behaviour_weights, decoupled_advantages,
)
from rlhf_fast.reference import off_policy as ref
from rlhf_fast.testing import assert_no_worse_than_baseline


def test_weights_by_hand():
    prox = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    behav = torch.tensor([[0.0, -2.0, -1.0, -3.0]])
    mask = torch.tensor([[True, True, True, False]])
    w = behaviour_weights(prox, behav, mask)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.e, 1 / math.e, 0.0]]))
    w2 = behaviour_weights(prox, behav, mask, cap=2.0)  # truncated importance sampling: min(w, 2)
    torch.testing.assert_close(w2, torch.tensor([[1.0, 2.0, 1 / math.e, 0.0]]))
    # a token outside the proximal policy's top-k set (log-prob -inf) gets weight 0
    assert behaviour_weights(torch.tensor([[-math.inf]]), torch.tensor([[-1.0]]), torch.tensor([[True]])).item() == 0.0


def test_registry_entries_say_whether_they_truncate():
    prox, behav, mask = torch.tensor([[0.0]]), torch.tensor([[-3.0]]), torch.tensor([[True]])
    assert OFF_POLICY_CORRECTIONS["decoupled"].weights(prox, behav, mask, cap=2.0).item() == pytest.approx(math.e ** 3)
    assert OFF_POLICY_CORRECTIONS["truncated_is"].weights(prox, behav, mask, cap=2.0).item() == 2.0
    with pytest.raises(ValueError, match="off-policy correction"):
        OFF_POLICY_CORRECTIONS["nope"]


def test_bad_input_named():
    with pytest.raises(ValueError, match="one shape"):
        behaviour_weights(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="cap"):
        behaviour_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), cap=0.0)


def test_staleness_zero_is_the_synchronous_loss_bit_for_bit():
    """With behaviour = proximal (the hybrid engine's log-probs are the trainer's numbers) every
    weight is exactly 1 and the decoupled loss and its gradient are the plain clipped loss's."""
    g = torch.Generator().manual_seed(0)
    prox = -torch.rand(3, 7, generator=g) * 3
    lp0 = prox + torch.randn(3, 7, generator=g) * 0.1
    adv = torch.randn(3, 7, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.2
    w = behaviour_weights(prox, prox.clone(), mask)
    assert w[mask].eq(1.0).all()
    params = algos.PolicyLossParams()

    def run(a):
        x = lp0.clone().requires_grad_()
        out = algos.ppo_clip_loss(x, prox, a, mask, params)
        out.loss.backward()
        return out.loss.detach(), x.grad

    (l0, g0), (l1, g1) = run(adv), run(decoupled_advantages(adv, w))
    assert torch.equal(l0, l1) and torch.equal(g0, g1)


def _mask(kind: str, B: int, T: int, g: torch.Generator) -> torch.Tensor:
    if kind == "all":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "right":  # right padding, one row may be empty
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        return torch.arange(T)[None, :] < lengths[:, None]
    return torch.rand(B, T, generator=g) > 0.4  # holes


@st.composite
def cases(draw):
    return dict(B=draw(st.integers(1, 5)), T=draw(st.integers(1, 17)), kind=draw(st.sampled_from(("all", "right", "holes"))),
                seed=draw(st.integers(0, 2**31 - 1)), stale=draw(st.sampled_from([0.0, 1e-3, 0.3, 2.0])),
                cap=draw(st.none() | st.sampled_from([1.0, 2.0]) | st.floats(0.5, 10.0)),
                clip=draw(st.sampled_from([0.2]) | st.floats(1e-3, 0.5)),
                clip_high=draw(st.none() | st.floats(1e-3, 0.5)), dual=draw(st.none() | st.floats(1.5, 5.0)),
                scale=draw(st.sampled_from([1e-3, 0.1, 0.5])))


def _draw(case):
    g = torch.Generator().manual_seed(case["seed"])
    B, T = case["B"], case["T"]
    mask = _mask(case["kind"], B, T, g)
    behav = -torch.rand(B, T, generator=g) * 4  # (B, T) the engine's log-probs of the sampled tokens
    prox = behav + torch.randn(B, T, generator=g) * case["stale"]  # the trainer's at the start of the update
    lp = prox + torch.randn(B, T, generator=g) * case["scale"]  # the policy being trained
    adv = torch.randn(B, T, generator=g)
    return mask, behav, prox, lp, adv


@given(cases())
@example(dict(B=1, T=1, kind="right", seed=0, stale=2.0, cap=None, clip=0.2, clip_high=None, dual=None, scale=0.1))
def test_weights_vs_reference(case):
    note(case)
    mask, behav, prox, _, _ = _draw(case)
    w = behaviour_weights(prox, behav, mask, cap=case["cap"])
    oracle = ref.behaviour_weights(prox, behav, mask, cap=case["cap"])
    base = ref.behaviour_weights(prox, behav, mask, cap=case["cap"], compute_dtype=torch.float32)
    assert_no_worse_than_baseline("behaviour_weights", w, oracle, base, atol=1e-6)
    assert w[~mask].eq(0).all()
    # float64 in, float64 out: the loop and the vectorised form agree to rounding
    torch.testing.assert_close(behaviour_weights(prox.double(), behav.double(), mask, cap=case["cap"]), oracle,
                               rtol=1e-12, atol=0)


@given(cases())
@example(dict(B=2, T=3, kind="holes", seed=3, stale=0.3, cap=2.0, clip=0.2, clip_high=0.28, dual=3.0, scale=0.5))
def test_decoupled_loss_vs_reference(case):
    """The fast path (``ppo_clip`` with ``w * A``) against the decoupled objective written out:
    loss and gradient in float32 under the numerical contract, and in float64 to rounding."""
    note(case)
    mask, behav, prox, lp, adv = _draw(case)
    params = algos.PolicyLossParams(clip_low=case["clip"], clip_high=case["clip_high"], dual_clip=case["dual"])
    kw = dict(clip_low=case["clip"], clip_high=case["clip_high"], dual_clip=case["dual"], cap=case["cap"])

    def ours(dtype):
        x = lp.to(dtype).clone().requires_grad_()
        w = behaviour_weights(prox.to(dtype), behav.to(dtype), mask, cap=case["cap"])
        out = algos.ppo_clip_loss(x, prox.to(dtype), decoupled_advantages(adv.to(dtype), w), mask, params)
        out.loss.backward()
        return out.loss.detach(), x.grad

    def oracle(dtype):
        x = lp.to(dtype).clone().requires_grad_()
        loss = ref.decoupled_ppo_loss(x, prox, behav, adv, mask, **kw, compute_dtype=dtype)
        loss.backward()
        return loss.detach(), (x.grad if x.grad is not None else torch.zeros_like(x))

    (l32, g32), (l64, g64), (b_l, b_g) = ours(torch.float32), oracle(torch.float64), oracle(torch.float32)
    assert_no_worse_than_baseline("decoupled loss", l32.reshape(1), l64.reshape(1), b_l.reshape(1), atol=1e-6)
    assert_no_worse_than_baseline("decoupled loss grad", g32, g64, b_g, atol=1e-7)
    f_l, f_g = ours(torch.float64)
    torch.testing.assert_close(f_l, l64, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(f_g, g64, rtol=1e-12, atol=1e-15)


def test_weight_stats():
    prox = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    behav = torch.tensor([[0.0, -2.0, -1.0, -3.0]])
    mask = torch.tensor([[True, True, True, False]])
    s = WeightStats.of(prox, behav, mask, cap=2.0)
    assert s.mean == pytest.approx((1 + math.e + 1 / math.e) / 3) and s.max == pytest.approx(math.e)
    assert s.min == pytest.approx(1 / math.e) and s.truncated_frac == pytest.approx(1 / 3)
    empty = WeightStats.of(prox, behav, torch.zeros_like(mask))
    assert (empty.mean, empty.truncated_frac) == (1.0, 0.0)
    assert set(s.to_dict()) == {"async/is_weight_mean", "async/is_weight_min", "async/is_weight_max",
                                "async/is_truncated_frac"}
