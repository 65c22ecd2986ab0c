"""The Triton kernels of kernels/rlmath.py, launched directly: under TRITON_INTERPRET=1 on CPU
tensors (small sizes: the interpreter runs scans element by element in Python), natively on a GPU.
Small BLOCK_T values force several chunks per row, to test the carries between chunks."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402

from rlhf_fast.reference import rlmath as ref  # noqa: E402
from rlhf_fast.testing import assert_no_worse_than_baseline  # noqa: E402

from _rlmath_cases import atol_for, rl_cases, tensors  # noqa: E402

K = pytest.importorskip("rlhf_fast.kernels.rlmath")
pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(K, "_row_block", lambda T, device: 8)


def _dev(*ts):
    return [t.to(DEVICE) for t in ts]


@given(rl_cases(max_b=4, max_t=40), hst.booleans())
@example(dict(B=1, T=1, dtype=torch.float32, kind="all", gamma=1.0, lam=1.0, seed=0), False)
@example(dict(B=2, T=17, dtype=torch.float32, kind="holes", gamma=0.5, lam=1.0, seed=3), True)
@settings(max_examples=15, deadline=None)
def test_gae_kernel_vs_reference(case, chunked):
    r, v, m, _ = tensors(case, scale=2.0)
    g, lam = case["gamma"], case["lam"]
    old = K._row_block
    if chunked:
        K._row_block = lambda T, device: 8
    try:
        adv, ret = K.gae_fwd(*_dev(r, v, m), g, lam)
    finally:
        K._row_block = old
    o_adv, o_ret = ref.gae(r, v, m, gamma=g, lam=lam, compute_dtype=torch.float64)
    b_adv, b_ret = ref.gae(r, v, m, gamma=g, lam=lam, compute_dtype=torch.float32)
    assert_no_worse_than_baseline("advantages", adv, o_adv, b_adv, atol=atol_for(o_adv))
    assert_no_worse_than_baseline("returns", ret, o_ret, b_ret, atol=atol_for(o_ret))


@given(rl_cases(max_b=4, max_t=40), hst.sampled_from(["k1", "k2", "k3"]), hst.sampled_from([None, 0.5]),
       hst.booleans())
@settings(max_examples=15, deadline=None)
def test_shape_rewards_kernel_vs_reference(case, estimator, clamp, chunked):
    lp, rf, m, gen = tensors(case)
    s = torch.randn(case["B"], generator=gen).to(case["dtype"])
    kw = dict(kl_coef=0.07, estimator=estimator, clamp=clamp)
    old = K._row_block
    if chunked:
        K._row_block = lambda T, device: 8
    try:
        rw, kl = K.shape_rewards_fwd(*_dev(s, lp, rf, m), 0.07, estimator, clamp)
    finally:
        K._row_block = old
    o_rw, o_kl = ref.shape_rewards(s, lp, rf, m, **kw, compute_dtype=torch.float64)
    b_rw, b_kl = ref.shape_rewards(s, lp, rf, m, **kw, compute_dtype=torch.float32)
    assert_no_worse_than_baseline("rewards", rw, o_rw, b_rw, atol=atol_for(o_rw))
    assert_no_worse_than_baseline("kl", kl, o_kl, b_kl, atol=atol_for(o_kl))
    k = K.kl_penalty_fwd(*_dev(lp, rf), estimator, clamp)
    o_k = ref.kl_penalty(lp, rf, estimator=estimator, clamp=clamp, compute_dtype=torch.float64)
    b_k = ref.kl_penalty(lp, rf, estimator=estimator, clamp=clamp, compute_dtype=torch.float32)
    assert_no_worse_than_baseline("kl_penalty", k, o_k, b_k, atol=atol_for(o_k))


@given(rl_cases(max_b=6, max_t=300), hst.booleans(), hst.booleans())
@settings(max_examples=15, deadline=None)
def test_whitening_kernels_vs_reference(case, shift_mean, unbiased):
    x, _, m, _ = tensors(case, scale=3.0)
    x = x + torch.tensor(4.0).to(x.dtype)
    stats = K.masked_moments_fwd(*_dev(x, m))
    out = K.masked_whiten_apply_fwd(*_dev(x, m, stats), shift_mean, unbiased, 1e-8)
    kw = dict(shift_mean=shift_mean, unbiased=unbiased, eps=1e-8)
    o = ref.masked_whiten(x, m, **kw, compute_dtype=torch.float64)
    b = ref.masked_whiten(x, m, **kw, compute_dtype=torch.float32)
    assert_no_worse_than_baseline("masked_whiten", out, o, b, atol=atol_for(o, 1e-5))
    n, mean, _ = stats.cpu().unbind()
    assert int(n) == int(m.sum())
    o_mean = ref.masked_mean(x, m, compute_dtype=torch.float64)
    assert_no_worse_than_baseline("mean", mean, o_mean, ref.masked_mean(x, m), atol=atol_for(o_mean, 1e-5))


def test_moments_merge_across_many_blocks():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5000, generator=gen) * 2 + 100.0  # 15000 entries: 4 partial blocks of 4096
    m = torch.rand(3, 5000, generator=gen) < 0.5
    n, mean, m2 = K.masked_moments_fwd(*_dev(x, m)).cpu().unbind()
    xd = x.double()[m]
    assert int(n) == xd.numel()
    torch.testing.assert_close(mean, xd.mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(m2 / (n - 1), xd.var(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("offset,spread", [(1e7, 1.0), (50.0, 0.1), (-3e3, 0.01)])
def test_whitening_large_offset(offset, spread):
    """A mean much larger than the spread, over several 4096-entry blocks (with an all-masked
    block): block sums of x, not of x - pivot, and a float32 mean in the apply step, lost the
    variance (the C++ kernel gave 37414 for a variance of 1.08 at 1e7)."""
    gen = torch.Generator().manual_seed(1)
    x = (offset + spread * torch.randn(3, 4000, generator=gen, dtype=torch.float64)).float()
    m = torch.rand(3, 4000, generator=gen) < 0.7
    m[1, :] = False  # 4000 masked entries: the second block is all masked
    stats = K.masked_moments_fwd(*_dev(x, m))
    n, mean, m2 = stats.cpu().unbind()
    xd = x.double()[m]
    assert int(n) == xd.numel()
    assert float(m2 / (n - 1)) == pytest.approx(float(xd.var()), rel=1e-4)
    for shift_mean in (True, False):
        out = K.masked_whiten_apply_fwd(*_dev(x, m, stats), shift_mean, True, 1e-8).cpu()
        kw = dict(shift_mean=shift_mean, unbiased=True, eps=1e-8)
        o = ref.masked_whiten(x, m, **kw, compute_dtype=torch.float64)
        b = ref.masked_whiten(x, m, **kw, compute_dtype=torch.float32)
        assert_no_worse_than_baseline("masked_whiten", out, o, b, atol=atol_for(o, 1e-5))


def test_empty_and_long_row_carries(small_blocks):
    # T = 45 with BLOCK_T = 8: 6 chunks; a long hole spanning whole chunks; an empty row.
    gen = torch.Generator().manual_seed(5)
    B, T = 3, 45
    r, v = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, 10:30] = False
    m[1] = False
    m[2, 40:] = False
    adv, ret = K.gae_fwd(*_dev(r, v, m), 0.97, 0.9)
    o_adv, o_ret = ref.gae(r.double(), v.double(), m, gamma=0.97, lam=0.9)
    torch.testing.assert_close(adv.cpu().double(), o_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret.cpu().double(), o_ret, atol=1e-5, rtol=1e-5)
    rw, _ = K.shape_rewards_fwd(*_dev(torch.tensor([1.0, 2.0, 3.0]), r, v, m), 0.1, "k1", None)
    assert float(rw[2, 39]) == pytest.approx(float(-0.1 * (r[2, 39] - v[2, 39]) + 3.0), abs=1e-6)
    assert torch.equal(rw[1].cpu(), torch.zeros(T))
