"""kl_penalty, shape_rewards, gae, masked_{mean,var,whiten}: the public ops (C++ kernels on CPU)
against the float64 reference, hand-computed examples, the TRL loop, errors and opcheck."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as hst

import rlhf_fast.ops as ops
from rlhf_fast import _rlmath_checks
from rlhf_fast.ops import _library
from rlhf_fast.ops import rlmath as ops_rlmath
from rlhf_fast.reference import rlmath as ref
from rlhf_fast.testing import assert_no_worse_than_baseline

from _rlmath_cases import MASK_KINDS, atol_for, make_mask, rl_cases, tensors, trl_gae

ESTIMATORS = _rlmath_checks.KL_ESTIMATORS  # the one list: C++, Triton, ops and reference are all drawn from it


# ---- hand-computed 1x4 examples (torchtune style: expected values as formulas) ---------------

def test_gae_hand_1x4_with_hole():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    v = torch.tensor([[0.5, -1.0, 10.0, 2.0]])
    m = torch.tensor([[1, 1, 0, 1]])
    g, lam = 0.9, 0.8
    d3 = 4.0 + g * 0.0 - 2.0  # value after the last valid token is 0
    a3 = d3
    d1 = 2.0 + g * 2.0 - (-1.0)  # token 2 is a hole: the next value is token 3's
    a1 = d1 + g * lam * a3
    d0 = 1.0 + g * (-1.0) - 0.5
    a0 = d0 + g * lam * a1
    adv, ret = ops.gae(r, v, m, gamma=g, lam=lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, 0.0, a3]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 - 1.0, 0.0, a3 + 2.0]]))


def test_gae_hand_1x4_right_padded_gamma_lam_zero():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    v = torch.tensor([[0.5, -1.0, 10.0, 2.0]])
    m = torch.tensor([[True, True, True, False]])
    adv, ret = ops.gae(r, v, m, gamma=0.0, lam=0.0)  # one-step TD with no bootstrap: A = r - V
    torch.testing.assert_close(adv, torch.tensor([[1.0 - 0.5, 2.0 + 1.0, 3.0 - 10.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 2.0, 3.0, 0.0]]))


def test_shape_rewards_hand_1x4():
    s = torch.tensor([2.5])
    lp = torch.tensor([[-1.0, -2.0, -0.5, 1.0]])  # the padded log-prob is INVALID_LOGPROB = 1.0
    rf = torch.tensor([[-1.5, -1.0, -0.5, -9.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    c = 0.1
    rewards, kl = ops.shape_rewards(s, lp, rf, m, kl_coef=c, estimator="k1")
    k = [-1.0 + 1.5, -2.0 + 1.0, -0.5 + 0.5]
    torch.testing.assert_close(kl, torch.tensor([[k[0], k[1], k[2], 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-c * k[0], -c * k[1], -c * k[2] + 2.5, 0.0]]))


def test_kl_penalty_hand():
    lp = torch.tensor([0.0, -1.0, -0.25])
    rf = torch.tensor([-1.0, 0.0, -0.25])
    d = [1.0, -1.0, 0.0]
    torch.testing.assert_close(ops.kl_penalty(lp, rf, estimator="k1"), torch.tensor(d))
    torch.testing.assert_close(ops.kl_penalty(lp, rf, estimator="k2"), torch.tensor([0.5 * x * x for x in d]))
    k3 = [math.exp(-x) + x - 1 for x in d]
    torch.testing.assert_close(ops.kl_penalty(lp, rf, estimator="k3"), torch.tensor(k3))
    torch.testing.assert_close(ops.kl_penalty(lp, rf, estimator="k3", clamp=0.5), torch.tensor([k3[0], 0.5, 0.0]))


def test_masked_whiten_hand_1x4():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    eps = 1e-8
    # mean 2; unbiased var (1 + 0 + 1) / 2 = 1; biased 2 / 3.
    torch.testing.assert_close(ops.masked_whiten(x, m), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]) / math.sqrt(1 + eps))
    rs = 1 / math.sqrt(2 / 3 + eps)
    torch.testing.assert_close(ops.masked_whiten(x, m, unbiased=False), torch.tensor([[-rs, 0.0, rs, 0.0]]))
    torch.testing.assert_close(
        ops.masked_whiten(x, m, shift_mean=False), torch.tensor([[2 - 1.0, 2.0, 2 + 1.0, 0.0]]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(ops.masked_mean(x, m), torch.tensor(2.0))
    torch.testing.assert_close(ops.masked_var(x, m), torch.tensor(1.0))
    torch.testing.assert_close(ops.masked_var(x, m, unbiased=False), torch.tensor(2 / 3))


# ---- structural identities -------------------------------------------------------------------

@given(rl_cases(dtypes=(torch.float32,)))
@settings(max_examples=20, deadline=None)
def test_gae_matches_trl_loop_right_padded(case):
    case = dict(case, kind="right")
    r, v, m, _ = tensors(case)
    g, lam = case["gamma"], case["lam"]
    adv, ret = ops.gae(r, v, m, gamma=g, lam=lam)
    o_adv, o_ret = trl_gae(r.double(), v.double(), m, g, lam)
    b_adv, b_ret = trl_gae(r, v, m, g, lam)
    assert_no_worse_than_baseline("adv", adv, o_adv, b_adv, atol=atol_for(o_adv))
    assert_no_worse_than_baseline("ret", ret, o_ret, b_ret, atol=atol_for(o_ret))
    # and the reference (mask-aware loop) is the TRL loop, exactly, in float64
    r_adv, r_ret = ref.gae(r.double(), v.double(), m, gamma=g, lam=lam)
    torch.testing.assert_close(r_adv, o_adv, atol=1e-12, rtol=0)
    torch.testing.assert_close(r_ret, o_ret, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["all", "holes", "right"])
def test_gae_gamma_lam_one_gives_reverse_cumsum(kind):
    gen = torch.Generator().manual_seed(3)
    B, T = 4, 33
    r, v = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    m = make_mask(kind, B, T, gen)
    _, ret = ops.gae(r, v, m, gamma=1.0, lam=1.0)
    rm = torch.where(m, r, 0.0).double()
    expected = torch.where(m, rm.flip(-1).cumsum(-1).flip(-1), 0.0)
    torch.testing.assert_close(ret.double(), expected, atol=1e-5, rtol=1e-6)


def test_masked_var_matches_torch_var():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 131, generator=gen) * 3 + 5
    torch.testing.assert_close(ops.masked_var(x, torch.ones_like(x, dtype=torch.bool)), torch.var(x))
    torch.testing.assert_close(
        ops.masked_var(x, torch.ones_like(x), unbiased=False), torch.var(x, correction=0)
    )
    m = make_mask("holes", 7, 131, gen)
    torch.testing.assert_close(ops.masked_var(x, m), torch.var(x[m]))
    torch.testing.assert_close(ops.masked_mean(x, m), x[m].mean())


def test_empty_rows_give_zeros_never_nan():
    B, T = 3, 5
    z = torch.zeros(B, T, dtype=torch.bool)
    x = torch.randn(B, T)
    adv, ret = ops.gae(x, x, z, gamma=1.0, lam=0.95)
    rw, kl = ops.shape_rewards(torch.ones(B), x, x + 1, z, kl_coef=0.1, estimator="k3")
    for t in (adv, ret, rw, kl, ops.masked_whiten(x, z)):
        assert torch.equal(t, torch.zeros(B, T))
    assert float(ops.masked_mean(x, z)) == 0.0 and float(ops.masked_var(x, z)) == 0.0
    one = torch.zeros(B, T, dtype=torch.bool)
    one[1, 2] = True  # a single valid entry: unbiased var would be 0/0; we give 0
    assert float(ops.masked_var(x, one)) == 0.0
    assert torch.isfinite(ops.masked_whiten(x, one)).all()


def test_masked_padding_values_are_ignored():
    """NaN / inf in masked positions (e.g. INVALID_LOGPROB pads, garbage values) never leak."""
    gen = torch.Generator().manual_seed(1)
    B, T = 3, 9
    m = make_mask("holes", B, T, gen)
    r, v = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    r_bad, v_bad = r.masked_fill(~m, float("nan")), v.masked_fill(~m, float("inf"))
    for a, b in zip(ops.gae(r, v, m, gamma=0.9, lam=0.9), ops.gae(r_bad, v_bad, m, gamma=0.9, lam=0.9)):
        assert torch.equal(a, b)
    lp_bad = torch.randn(B, T, generator=gen).masked_fill(~m, -1e30)
    rw, kl = ops.shape_rewards(torch.ones(B), lp_bad, torch.zeros(B, T), m, kl_coef=0.1, estimator="k3")
    assert torch.isfinite(rw).all() and torch.isfinite(kl).all()
    assert torch.equal(ops.masked_whiten(r_bad, m), ops.masked_whiten(r, m))


def test_leading_dims_and_non_contiguous():
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(2, 3, 11, generator=gen)
    v = torch.randn(2, 11, 3, generator=gen).transpose(1, 2)  # non-contiguous
    m = torch.rand(2, 3, 11, generator=gen) < 0.7
    adv, ret = ops.gae(r, v, m, gamma=0.99, lam=0.9)
    o_adv, o_ret = ref.gae(r.double(), v.double(), m, gamma=0.99, lam=0.9)
    torch.testing.assert_close(adv.double(), o_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.double(), o_ret, atol=1e-5, rtol=1e-5)
    s = torch.randn(2, 3, generator=gen)
    rw, kl = ops.shape_rewards(s, r, v, m, kl_coef=0.2, estimator="k2")
    o_rw, o_kl = ref.shape_rewards(s.double(), r.double(), v.double(), m, kl_coef=0.2, estimator="k2")
    torch.testing.assert_close(rw.double(), o_rw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl.double(), o_kl, atol=1e-5, rtol=1e-5)


# ---- property tests against the float64 reference (C++ path) ---------------------------------

@given(rl_cases())
@example(dict(B=1, T=1, dtype=torch.float32, kind="all", gamma=1.0, lam=1.0, seed=0))
@example(dict(B=3, T=1, dtype=torch.bfloat16, kind="empty", gamma=0.0, lam=0.0, seed=1))
@settings(max_examples=40, deadline=None)
def test_gae_vs_reference(case):
    r, v, m, _ = tensors(case, scale=2.0)
    g, lam = case["gamma"], case["lam"]
    adv, ret = ops.gae(r, v, m, gamma=g, lam=lam)
    o_adv, o_ret = ref.gae(r, v, m, gamma=g, lam=lam, compute_dtype=torch.float64)
    b_adv, b_ret = ref.gae(r, v, m, gamma=g, lam=lam, compute_dtype=torch.float32)
    assert adv.dtype == ret.dtype == torch.float32
    assert_no_worse_than_baseline("advantages", adv, o_adv, b_adv, atol=atol_for(o_adv))
    assert_no_worse_than_baseline("returns", ret, o_ret, b_ret, atol=atol_for(o_ret))


@given(rl_cases(max_b=80, max_t=40))
@example(dict(B=64, T=33, dtype=torch.float32, kind="holes", gamma=0.99, lam=0.95, seed=3))
@settings(max_examples=25, deadline=None)
def test_gae_wide_batches_vs_reference_and_row_alone(case):
    """Batches wide enough for the kernel's paired lane groups (two groups of W rows per recurrence
    step in csrc/rlmath_gae.cpp: 32+ rows on AVX-512, 16+ on AVX2) and the row tail: the contract
    against float64, and every row gives the bits it gives alone."""
    r, v, m, _ = tensors(case, scale=2.0)
    g, lam = case["gamma"], case["lam"]
    adv, ret = ops.gae(r, v, m, gamma=g, lam=lam)
    o_adv, o_ret = ref.gae(r, v, m, gamma=g, lam=lam, compute_dtype=torch.float64)
    b_adv, b_ret = ref.gae(r, v, m, gamma=g, lam=lam, compute_dtype=torch.float32)
    assert_no_worse_than_baseline("advantages", adv, o_adv, b_adv, atol=atol_for(o_adv))
    assert_no_worse_than_baseline("returns", ret, o_ret, b_ret, atol=atol_for(o_ret))
    for i in {0, case["B"] // 2, case["B"] - 1}:
        a1, r1 = ops.gae(r[i : i + 1], v[i : i + 1], m[i : i + 1], gamma=g, lam=lam)
        assert torch.equal(a1[0], adv[i]) and torch.equal(r1[0], ret[i]), i


@given(rl_cases(), hst.sampled_from(ESTIMATORS),
       hst.sampled_from([None, 0.5, 10.0]))
@example(dict(B=2, T=1, dtype=torch.float32, kind="holes", gamma=0.0, lam=0.0, seed=0), "k3", None)
@settings(max_examples=40, deadline=None)
def test_shape_rewards_and_kl_vs_reference(case, estimator, clamp):
    lp, rf, m, gen = tensors(case)
    s = torch.randn(case["B"], generator=gen).to(case["dtype"]) * 3
    kl_coef = case["gamma"] * 0.3 - 0.05
    kw = dict(kl_coef=kl_coef, estimator=estimator, clamp=clamp)
    rw, kl = ops.shape_rewards(s, lp, rf, m, **kw)
    o_rw, o_kl = ref.shape_rewards(s, lp, rf, m, **kw, compute_dtype=torch.float64)
    b_rw, b_kl = ref.shape_rewards(s, lp, rf, m, **kw, compute_dtype=torch.float32)
    assert_no_worse_than_baseline("rewards", rw, o_rw, b_rw, atol=atol_for(o_rw))
    assert_no_worse_than_baseline("kl", kl, o_kl, b_kl, atol=atol_for(o_kl))
    # kl_penalty (unmasked), forward and gradient w.r.t. both inputs, one shared upstream gradient
    lp_c, rf_c = lp.clone().requires_grad_(), rf.clone().requires_grad_()
    k = ops.kl_penalty(lp_c, rf_c, estimator=estimator, clamp=clamp)
    lp_o, rf_o = lp.double().requires_grad_(), rf.double().requires_grad_()
    k_o = ref.kl_penalty(lp_o, rf_o, estimator=estimator, clamp=clamp)
    lp_b, rf_b = lp.clone().requires_grad_(), rf.clone().requires_grad_()
    k_b = ref.kl_penalty(lp_b, rf_b, estimator=estimator, clamp=clamp, compute_dtype=torch.float32)
    assert k.dtype == torch.float32
    assert_no_worse_than_baseline("kl_penalty", k, k_o, k_b, atol=atol_for(k_o))
    up = torch.randn(k.shape, generator=gen)
    g_c = torch.autograd.grad(k, (lp_c, rf_c), up)
    g_o = torch.autograd.grad(k_o, (lp_o, rf_o), up.double())
    g_b = torch.autograd.grad(k_b, (lp_b, rf_b), up)
    for name, c_, o_, b_ in zip(("d_logprobs", "d_ref"), g_c, g_o, g_b):
        assert c_.dtype == lp.dtype
        assert_no_worse_than_baseline(name, c_, o_, b_, atol=atol_for(o_, 1e-5))


@given(rl_cases(max_b=6, max_t=64), hst.booleans(),
       hst.booleans())
@settings(max_examples=30, deadline=None)
def test_masked_whiten_vs_reference(case, shift_mean, unbiased):
    x, _, m, _ = tensors(case, scale=3.0)
    x = x + torch.tensor(4.0).to(x.dtype)  # an offset, so shift_mean matters
    kw = dict(shift_mean=shift_mean, unbiased=unbiased, eps=1e-8)
    out = ops.masked_whiten(x, m, **kw)
    o = ref.masked_whiten(x, m, **kw, compute_dtype=torch.float64)
    b = ref.masked_whiten(x, m, **kw, compute_dtype=torch.float32)
    assert_no_worse_than_baseline("masked_whiten", out, o, b, atol=atol_for(o, 1e-5))
    for name, fn, kwargs in (("masked_mean", "masked_mean", {}), ("masked_var", "masked_var", dict(unbiased=unbiased))):
        c_ = getattr(ops, fn)(x, m, **kwargs)
        o_ = getattr(ref, fn)(x, m, **kwargs, compute_dtype=torch.float64)
        b_ = getattr(ref, fn)(x, m, **kwargs, compute_dtype=torch.float32)
        assert_no_worse_than_baseline(name, c_, o_, b_, atol=atol_for(o_, 1e-5))


@given(hst.integers(1, 4), hst.integers(1, 3000), hst.sampled_from([4.0, 50.0, -3e3, 1e4, 1e7]),
       hst.sampled_from([0.01, 0.1, 1.0, 3.0]), hst.sampled_from(MASK_KINDS), hst.booleans(), hst.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_masked_moments_offset_and_chunks(B, T, offset, spread, kind, shift_mean, seed):
    """Means much larger than the spread (x = offset + spread * N(0, 1)) and sizes spanning several
    of the C++ kernel's 2048-element chunks. Found by a QA pass: float32 chunk sums of x drifted
    the chunk means (by ~86 at an offset of 1e7: a variance of 37414 for data of variance 2), and
    whitening rounded the mean to one float."""
    gen = torch.Generator().manual_seed(seed)
    x = (offset + spread * torch.randn(B, T, generator=gen, dtype=torch.float64)).float()
    m = make_mask(kind, B, T, gen)
    for name, kwargs in (("masked_mean", {}), ("masked_var", dict(unbiased=True)),
                         ("masked_whiten", dict(shift_mean=shift_mean))):
        c_ = getattr(ops, name)(x, m, **kwargs)
        o_ = getattr(ref, name)(x, m, **kwargs, compute_dtype=torch.float64)
        b_ = getattr(ref, name)(x, m, **kwargs, compute_dtype=torch.float32)
        assert_no_worse_than_baseline(name, c_, o_, b_, atol=atol_for(o_, 1e-5))


def test_masked_var_large_offset_hand():
    """torch.var of the same float32 data (float64 arithmetic) is the answer; float32 chunk sums
    gave 37414 here."""
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).add(1e7).float()
    m = torch.ones_like(x, dtype=torch.bool)
    want = x.double().var()
    assert float(ops.masked_var(x, m)) == pytest.approx(float(want), rel=1e-5)
    assert float(ops.masked_mean(x, m)) == pytest.approx(float(x.double().mean()), abs=1.0)  # one float ulp at 1e7


# ---- bad input -------------------------------------------------------------------------------

def _bad_cases():
    r, v, m = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4, dtype=torch.bool)
    nan_r = r.clone()
    nan_r[1, 2] = float("nan")
    inf_v = v.clone()
    inf_v[1, 3] = float("inf")
    s = torch.randn(2)
    nan_s = torch.tensor([0.0, float("inf")])
    gae = lambda **k: ops.gae(**{**dict(rewards=r, values=v, mask=m, gamma=0.9, lam=0.9), **k})  # noqa: E731
    sr = lambda **k: ops.shape_rewards(  # noqa: E731
        **{**dict(scores=s, logprobs=r, ref_logprobs=v, mask=m, kl_coef=0.1, estimator="k1"), **k}
    )
    return [
        ("values shape", lambda: gae(values=torch.randn(2, 5)), "values"),
        ("mask shape", lambda: gae(mask=torch.ones(2, 3)), "mask"),
        ("mask values", lambda: gae(mask=torch.full((2, 4), 2)), "mask"),
        ("nan reward", lambda: gae(rewards=nan_r), r"rewards.*row \[1\]"),
        ("inf value", lambda: gae(values=inf_v), r"values.*row \[1\]"),
        ("gamma > 1", lambda: gae(gamma=1.01), "gamma"),
        ("lam < 0", lambda: gae(lam=-0.1), "lam"),
        ("lam nan", lambda: gae(lam=float("nan")), "lam"),
        ("integer rewards", lambda: gae(rewards=torch.ones(2, 4, dtype=torch.long)), "rewards"),
        ("0-dim rewards", lambda: ops.gae(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(True), gamma=1, lam=1),
         "rewards"),
        ("scores shape", lambda: sr(scores=torch.randn(3)), "scores"),
        ("nan score", lambda: sr(scores=nan_s), r"scores.*row \[1\]"),
        ("nan logprob", lambda: sr(logprobs=nan_r), r"^logprobs has a non-finite value nan in row \[1\] at token 2"),
        ("inf ref", lambda: sr(ref_logprobs=inf_v), r"^ref_logprobs has a non-finite value inf in row \[1\] at token 3"),
        ("ref shape", lambda: sr(ref_logprobs=torch.randn(2, 5)), "ref_logprobs"),
        ("estimator", lambda: sr(estimator="k4"), "estimator"),
        ("kl_coef inf", lambda: sr(kl_coef=float("inf")), "kl_coef"),
        ("kl_coef str", lambda: sr(kl_coef="a"), "kl_coef"),
        ("kl estimator", lambda: ops.kl_penalty(r, v, estimator="abs"), "estimator"),
        ("kl clamp", lambda: ops.kl_penalty(r, v, clamp=-1.0), "clamp"),
        ("kl shape", lambda: ops.kl_penalty(r, v[:, :3]), "ref_logprobs"),
        ("whiten mask", lambda: ops.masked_whiten(r, m[:, :2]), "mask"),
        ("whiten eps", lambda: ops.masked_whiten(r, m, eps=-1.0), "eps"),
        ("whiten x", lambda: ops.masked_whiten(m, m), "x"),
    ]


@pytest.mark.parametrize("name,fn,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_value_error_naming_argument(name, fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_nonfinite_results_from_finite_inputs_are_not_input_errors():
    """The CPU kernels check finiteness while they run (csrc/rlmath.cpp, csrc/rlmath_gae.cpp, issue 23) with the rule of
    the Python checks they replaced: only a non-finite input on a valid token is an error. k3
    overflowing from finite log-probs, a clamp bounding an inf log-prob, a GAE recurrence that
    overflows, and NaN padding on masked tokens all pass, on the vector body and the tail (T = 37)."""
    B, T = 3, 37
    m = torch.ones(B, T, dtype=torch.bool)
    z, s = torch.zeros(B, T), torch.zeros(B)
    lp = z.clone()
    lp[1, 3] = lp[2, 36] = -100.0  # d = -100: exp(100) overflows float32
    rewards, kl = ops.shape_rewards(s, lp, z, m, kl_coef=0.1, estimator="k3")
    assert torch.isinf(kl[1, 3]) and torch.isinf(kl[2, 36]) and torch.isinf(rewards[1, 3])
    inf_lp = z.clone()
    inf_lp[1, 5] = inf_lp[2, 36] = float("inf")
    _, kl = ops.shape_rewards(s, inf_lp, z, m, kl_coef=0.1, clamp=10.0)
    assert kl[1, 5] == 10.0 and kl[2, 36] == 10.0
    adv, _ = ops.gae(torch.full((B, T), 3e38), z, m, gamma=1.0, lam=1.0)
    assert torch.isinf(adv[:, 0]).all()
    nan_pad = torch.full((B, T), float("nan"))
    held = m.clone()
    held[:, 20:] = False
    nan_pad[:, :20] = 0.5
    adv, ret = ops.gae(nan_pad, nan_pad, held, gamma=1.0, lam=0.9)
    rewards, kl = ops.shape_rewards(s, nan_pad, nan_pad, held, kl_coef=0.1, estimator="k3")
    for out in (adv, ret, rewards, kl):
        assert torch.isfinite(out).all() and (out[:, 20:] == 0).all()


def test_reference_validates_the_same_way():
    with pytest.raises(ValueError, match="gamma"):
        ref.gae(torch.randn(1, 2), torch.randn(1, 2), torch.ones(1, 2), gamma=2.0, lam=1.0)
    with pytest.raises(ValueError, match="estimator"):
        ref.kl_penalty(torch.randn(2), torch.randn(2), estimator="k9")


# ---- custom-op plumbing ----------------------------------------------------------------------

def _opcheck_samples():
    gen = torch.Generator().manual_seed(0)
    B, T = 3, 7
    r, v = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen).bfloat16()
    m = make_mask("holes", B, T, gen)
    s = torch.randn(B, generator=gen)
    st = torch.ops.rlhf_fast.masked_moments(r, m)
    lp = torch.randn(B, T, generator=gen, requires_grad=True)
    return [
        (torch.ops.rlhf_fast.gae.default, (r, v, m, 0.99, 0.95)),
        (torch.ops.rlhf_fast.shape_rewards.default, (s, r, v, m, 0.05, "k3", None)),
        (torch.ops.rlhf_fast.shape_rewards.default, (s, r, r, m, 0.05, "k1", 2.0)),
        (torch.ops.rlhf_fast.kl_penalty.default, (lp, r, "k2", None)),
        (torch.ops.rlhf_fast.kl_penalty.default, (lp, r, "k3", 0.5)),
        (torch.ops.rlhf_fast.masked_moments.default, (r, m)),
        (torch.ops.rlhf_fast.masked_whiten_apply.default, (r, m, st, False, True, 1e-8)),
    ]


@pytest.mark.parametrize("op,args", _opcheck_samples())
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_schemas_mirror_cpp():
    if not _library.extension_loaded():
        pytest.skip("C++ library not built")
    for name, schema in ops_rlmath.SCHEMAS.items():
        expected = torch._C.parse_schema(f"rlhf_fast::{schema}")
        assert str(getattr(torch.ops.rlhf_fast, name).default._schema) == str(expected)


def test_estimator_registry_is_the_kernels():
    from rlhf_fast.kernels.rlmath import ESTIMATOR_CODES

    assert tuple(ESTIMATOR_CODES) == _rlmath_checks.KL_ESTIMATORS


def test_torch_compile_traces_gae_and_shaping():
    def step(s, lp, rf, v, m):
        rw, _ = torch.ops.rlhf_fast.shape_rewards(s, lp, rf, m, 0.1, "k1", None)
        return torch.ops.rlhf_fast.gae(rw, v, m, 1.0, 0.95)

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(2, generator=gen), *(torch.randn(2, 6, generator=gen) for _ in range(3)),
            torch.ones(2, 6, dtype=torch.bool))
    eager = step(*args)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(*args)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_ops_infer_shapes_on_meta_and_fake_tensors(mode):
    """Shape inference (meta tensors, FakeTensorMode) skips the value checks, which need data; it
    used to fail in them (DataDependentOutputException, .item() on a meta tensor)."""
    import contextlib

    from torch._subclasses.fake_tensor import FakeTensorMode

    dev = "meta" if mode == "meta" else "cpu"
    with FakeTensorMode() if mode == "fake" else contextlib.nullcontext():
        x = torch.randn(2, 3, 7, device=dev)
        y = torch.zeros(2, 3, dtype=torch.long, device=dev)
        m = torch.ones(2, 3, dtype=torch.bool, device=dev)
        lp, h = ops.gather_logprobs(x, y, return_entropy=True)
        assert lp.shape == h.shape == (2, 3)
        assert ops.linear_logprobs(torch.randn(2, 3, 4, device=dev), torch.randn(7, 4, device=dev), y).shape == (2, 3)
        adv, ret = ops.gae(x[..., 0], x[..., 1], m, gamma=1.0, lam=0.9)
        rw, kl = ops.shape_rewards(x[:, 0, 0], x[..., 0], x[..., 1], m, kl_coef=0.1)
        assert adv.shape == ret.shape == rw.shape == kl.shape == ops.masked_whiten(x[..., 0], m).shape == (2, 3)
