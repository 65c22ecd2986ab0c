"""The critic-free family (``rlhf_fast/algos/critic_free.py``): hand-computed cases, and
hypothesis property tests of each variant on the fused ops against the reference PPO's own
float64 formulas (``trainers/parity/ppo_reference.py``; docs/architecture.md, "Numerical contract")."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, note
from hypothesis import strategies as st

from rlhf_fast import algos as A
from rlhf_fast.algos import PPOHyperParams
from rlhf_fast.testing import assert_no_worse_than_baseline
from rlhf_fast.trainers.parity import ppo_reference as ref_ppo

from _rlmath_cases import make_mask


# ---- hand-computed ------------------------------------------------------------------------------


def test_dr_grpo_hand_two_groups():
    rewards = torch.zeros(4, 3)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 3.0, 1.0])
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1, 2] = False  # row 1 ends early: its reward at index 2 is padding
    adv, ret = A.compute_advantages("dr_grpo", A.AdvantageInput(rewards, mask, group_ids=torch.tensor([0, 0, 1, 1])),
                                    A.AdvantageParams())
    seq = torch.tensor([0.5, -0.5, 1.0, -1.0])  # r - group mean, no std division
    assert torch.allclose(adv, torch.where(mask, seq[:, None], 0.0)) and torch.equal(adv, ret)


def test_reinforce_pp_hand_returns_and_whitening():
    rewards = torch.tensor([[0.0, -0.1, 1.0], [-0.2, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    p = A.AdvantageParams(gamma=0.5, whiten_advantages=False)
    adv, ret = A.compute_advantages("reinforce_pp", A.AdvantageInput(rewards, mask), p)
    expected = torch.tensor([[-0.1 * 0.5 + 0.25, -0.1 + 0.5, 1.0], [-0.2 + 1.0, 2.0, 0.0]])
    assert torch.allclose(ret, expected, atol=1e-6) and torch.equal(adv, ret)
    adv_w, _ = A.compute_advantages("reinforce_pp", A.AdvantageInput(rewards, mask),
                                    A.AdvantageParams(gamma=0.5, whiten_advantages=True))
    v = expected[mask].double()
    w = (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-8)
    assert torch.allclose(adv_w[mask].double(), w, atol=1e-5) and adv_w[~mask].eq(0).all()


def test_reinforce_pp_baseline_hand():
    rewards = torch.zeros(4, 2)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 2.0, 2.0])
    mask = torch.ones(4, 2, dtype=torch.bool)
    inp = A.AdvantageInput(rewards, mask, group_ids=torch.tensor([0, 0, 1, 1]))
    adv, ret = A.compute_advantages("reinforce_pp_baseline", inp, A.AdvantageParams(whiten_advantages=False))
    assert torch.allclose(ret, torch.tensor([[0.5, 0.5], [-0.5, -0.5], [0.0, 0.0], [0.0, 0.0]]))
    assert A.ESTIMATORS["reinforce_pp_baseline"].needs_groups and not A.ESTIMATORS["reinforce_pp"].needs_groups
    with pytest.raises(ValueError, match="group_ids"):
        A.compute_advantages("reinforce_pp_baseline", A.AdvantageInput(rewards, mask), A.AdvantageParams())


def test_seq_mean_token_sum_norm_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    # (1 + 2 + 5 + 6 + 7 + 8) / (2 rows x 4 tokens): the normaliser ignores the lengths
    assert A.aggregate(x, mask, "seq-mean-token-sum-norm").item() == pytest.approx(29 / 8)
    assert A.AGGREGATIONS["seq-mean-token-sum-norm"].normalizer(mask).item() == 8.0
    assert A.aggregate(x, mask, "seq-mean-token-sum-norm", normalizer=16.0).item() == pytest.approx(29 / 16)


def test_gspo_hand_sequence_ratio():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0]])
    d = torch.tensor([[0.9, -0.1, 0.4, 9.0]])  # the last token is padding: ignored
    mask = torch.tensor([[True, True, True, False]])
    lp = (old + d).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    s = math.exp((0.9 - 0.1 + 0.4) / 3)  # 1.49: above 1 + 0.28
    out = A.policy_loss("gspo", lp, old, adv, mask, A.PolicyLossParams(clip_low=0.2, clip_high=0.28,
                                                                       aggregation="seq-mean"))
    assert out.loss.item() == pytest.approx(-min(s, 1.28))
    assert torch.allclose(out.logr[mask], torch.full((3,), math.log(s)))
    assert out.clipped[mask].all() and not out.clipped[~mask].any()
    out.loss.backward()
    # clipped (A > 0, ratio above the range): no gradient; unclipped: s / |y| on each valid token
    assert lp.grad.abs().max().item() == 0.0
    lp2 = (old + d * 0.1).requires_grad_()
    out2 = A.policy_loss("gspo", lp2, old, adv, mask, A.PolicyLossParams(clip_low=0.2, clip_high=0.28,
                                                                         aggregation="seq-mean"))
    out2.loss.backward()
    s2 = math.exp(0.1 * 1.2 / 3)
    assert torch.allclose(lp2.grad, torch.tensor([[-s2 / 3, -s2 / 3, -s2 / 3, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="dual_clip"):
        A.policy_loss("gspo", lp, old, adv, mask, A.PolicyLossParams(dual_clip=3.0))


def test_overlong_penalty_hand():
    lengths = torch.tensor([0, 16, 17, 18, 20, 21])
    pen = A.overlong_penalty(lengths, max_length=20, buffer=4, factor=0.5)
    assert torch.allclose(pen, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5, -0.5]))
    with pytest.raises(ValueError, match="buffer"):
        A.overlong_penalty(lengths, max_length=20, buffer=0)


def test_informative_groups_hand():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    keep = A.informative_groups(scores, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert keep.tolist() == [False, False, True, True, False, False]
    with pytest.raises(ValueError, match="samples_per_prompt"):
        A.informative_groups(scores, None)


def test_presets_name_registered_variants():
    for name in ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo"):
        hp = A.PRESETS[name]
        assert not hp.estimator.needs_values, name
    assert A.PRESETS["dapo"].clip_range_high == 0.28 and A.PRESETS["dapo"].dynamic_sampling
    assert A.PRESETS["grpo"].placement.in_loss and A.PRESETS["grpo"].kl_estimator == "k3"
    with pytest.raises(ValueError, match="dynamic_sampling"):
        PPOHyperParams(advantage_estimator="gae", dynamic_sampling=True)
    with pytest.raises(ValueError, match="overlong_buffer_fraction"):
        PPOHyperParams(overlong_buffer_fraction=1.5)


# ---- property tests against the reference PPO in float64 ----------------------------------------


@st.composite
def cases(draw):
    return dict(
        B=draw(st.integers(1, 6)), T=draw(st.integers(1, 20)), kind=draw(st.sampled_from(("all", "right", "holes"))),
        gamma=draw(st.sampled_from([1.0, 0.0]) | st.floats(0.0, 1.0)), whiten=draw(st.booleans()),
        unbiased=draw(st.booleans()), group=draw(st.integers(1, 3)), seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(cases(), st.sampled_from(["dr_grpo", "reinforce_pp", "reinforce_pp_baseline"]))
@example(dict(B=4, T=3, kind="holes", gamma=1.0, whiten=True, unbiased=False, group=2, seed=0), "reinforce_pp_baseline")
# a mask with holes: the baseline goes at the row's last valid token, not at the end of each run
@example(dict(B=4, T=5, kind="holes", gamma=1.0, whiten=False, unbiased=False, group=2, seed=11), "reinforce_pp_baseline")
# found by hypothesis 6.100 (the lowest allowed): holes with gamma < 1
@example(dict(B=3, T=3, kind="holes", gamma=0.5, whiten=False, unbiased=False, group=1, seed=0), "reinforce_pp")
def test_estimators_vs_reference(case, name):
    note(case)
    g = torch.Generator().manual_seed(case["seed"])
    B, T = case["B"], case["T"]
    mask = make_mask(case["kind"], B, T, g)
    rewards = torch.randn(B, T, generator=g) * 2
    group_ids = torch.arange(B) // case["group"]
    p = A.AdvantageParams(gamma=case["gamma"], whiten_advantages=case["whiten"], unbiased=case["unbiased"])
    adv, ret = A.compute_advantages(name, A.AdvantageInput(rewards=rewards, mask=mask, group_ids=group_ids), p)
    hp = PPOHyperParams(advantage_estimator=name, gamma=case["gamma"], whiten_advantages=case["whiten"],
                        whiten_unbiased=case["unbiased"])
    ro = A.Rollout(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, 1), torch.zeros(B, T, dtype=torch.long),
                   mask, torch.zeros(B), rewards=rewards, group_ids=group_ids)
    o_adv, o_ret = ref_ppo.compute_advantages(ro.replace(rewards=rewards.double()), hp, torch.float64)
    b_adv, b_ret = ref_ppo.compute_advantages(ro, hp, torch.float32)
    assert_no_worse_than_baseline(f"{name} advantages", adv, o_adv, b_adv, atol=1e-5)
    assert_no_worse_than_baseline(f"{name} returns", ret, o_ret, b_ret, atol=1e-5)
    assert adv[~mask].eq(0).all() and ret[~mask].eq(0).all()


@st.composite
def loss_cases(draw):
    return dict(
        B=draw(st.integers(1, 5)), T=draw(st.integers(1, 16)), kind=draw(st.sampled_from(("all", "right", "holes"))),
        seed=draw(st.integers(0, 2**31 - 1)), clip=draw(st.sampled_from([3e-4, 0.2]) | st.floats(1e-4, 0.5)),
        clip_high=draw(st.none() | st.sampled_from([4e-4, 0.28]) | st.floats(1e-4, 0.5)),
        agg=draw(st.sampled_from(["token-mean", "seq-mean", "seq-mean-token-sum-norm"])),
        scale=draw(st.sampled_from([1e-4, 0.05, 0.5])), loss=draw(st.sampled_from(["gspo", "ppo_clip"])),
    )


@given(loss_cases())
@example(dict(B=2, T=3, kind="holes", seed=0, clip=3e-4, clip_high=4e-4, agg="seq-mean", scale=1e-4, loss="gspo"))
def test_policy_losses_and_aggregations_vs_reference(case):
    """gspo and the Dr. GRPO aggregation (float32) against the reference PPO's written-out
    formulas in float64: loss values and gradients."""
    note(case)
    g = torch.Generator().manual_seed(case["seed"])
    B, T = case["B"], case["T"]
    mask = make_mask(case["kind"], B, T, g)
    old = -torch.rand(B, T, generator=g) * 3
    lp = old + torch.randn(B, T, generator=g) * case["scale"]
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()  # one advantage per row, as every estimator here
    hp = PPOHyperParams(advantage_estimator="grpo", policy_loss=case["loss"], clip_range=case["clip"],
                        clip_range_high=case["clip_high"], loss_aggregation=case["agg"])

    def ours():
        x = lp.detach().clone().requires_grad_()
        out = A.policy_loss(case["loss"], x, old, adv, mask, hp.policy_loss_params(),
                            normalizer=hp.aggregation.normalizer(mask))
        out.loss.backward()
        return out, x.grad

    def oracle(dtype):
        x = lp.to(dtype).detach().clone().requires_grad_()
        fm = mask.to(dtype)
        pg, ratio, clipped, _ = ref_ppo.policy_loss_per_token(x, old.to(dtype), adv.to(dtype), hp, mask=mask)
        loss = ref_ppo._aggregate(pg, fm, hp.loss_aggregation, ref_ppo._NORMALIZER_ORACLES[hp.loss_aggregation](fm, dtype))
        loss.backward()
        return loss, x.grad, ratio, clipped

    out, gx = ours()
    o_loss, o_gx, o_ratio, o_clipped = oracle(torch.float64)
    b_loss, b_gx, _, _ = oracle(torch.float32)
    assert_no_worse_than_baseline("policy loss", out.loss, o_loss, b_loss, atol=1e-6)
    assert_no_worse_than_baseline("d policy loss", gx, o_gx, b_gx, atol=1e-6)
    if mask.any():
        r = torch.exp(out.logr.double())[mask]
        assert torch.allclose(r, o_ratio.detach()[mask], rtol=1e-5, atol=1e-6)


@given(st.integers(1, 40), st.integers(1, 40), st.floats(0.0, 2.0), st.integers(0, 2**31 - 1))
def test_overlong_penalty_vs_loop(max_length, buffer, factor, seed):
    buffer = min(buffer, max_length)
    lengths = torch.randint(0, max_length + 3, (16,), generator=torch.Generator().manual_seed(seed))
    pen = A.overlong_penalty(lengths, max_length=max_length, buffer=buffer, factor=factor)
    for L, p in zip(lengths.tolist(), pen.tolist()):
        if L <= max_length - buffer:
            want = 0.0
        elif L <= max_length:
            want = factor * ((max_length - buffer) - L) / buffer
        else:
            want = -factor
        assert p == pytest.approx(want, rel=1e-6, abs=1e-7)


@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_informative_groups_vs_loop(n_groups, size, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 2, (n_groups * size,), generator=g).float()
    ids = torch.arange(n_groups * size) // size
    keep = A.informative_groups(scores, ids)
    for i in range(n_groups * size):
        grp = scores[ids == ids[i]]
        assert bool(keep[i]) == bool(grp.max() > grp.min())


# ---- one whole iteration: the fast loop against the reference PPO, for each preset --------------


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo"])
def test_critic_free_presets_match_reference(preset):
    from test_ppo_parity import assert_parity, make_rollout, run_both

    hp = A.PRESETS[preset].replace(num_epochs=2, num_minibatches=2, micro_batch_size=2)
    if preset == "gspo":  # a wider clip range so that the second epoch also moves the weights
        hp = hp.replace(clip_range=0.2, clip_range_high=0.28)
    rollout = make_rollout(8, 5, 6, seed=4, holes=True, group_size=1 if preset == "reinforce_pp" else 4)
    assert_parity(*run_both(hp, rollout, separate_critic=False))
