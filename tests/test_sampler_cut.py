"""The sampler's kept set and token choice without a sort over the vocabulary (issue 35).

- ``torch.ops.rlhf_fast.kept_cut`` (C++ on CPU: running top candidates, then a histogram of the mass
  for flat rows) and its torch twin (``_filter.kept_cut_torch``: CUDA and no-compiler) against the
  rule's definition with a full sort (``rlhf_fast.reference.sampling.kept_cut``), on hypothesis rows
  covering ties, -inf tokens, NaN rows, every path of the kernel (peaked, flat, a top-k above the
  candidate limit) and V up to 151,936; cases where a token's mass above lies within rounding of
  top_p * S (ill-conditioned: the summation order decides) are left out.
- rows of V >= 16,384, where flat-ish rows take the sampled bracket (csrc/kept_cut.h), against the
  same definition, and a check that every way of the kernel is taken.
- ``torch.ops.rlhf_fast.sample_tokens`` against its torch twin and the inverse CDF of the reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import rlhf_fast.ops  # noqa: F401  (registers the ops)
from rlhf_fast import _filter
from rlhf_fast.ops import _library
from rlhf_fast.ops import sampling as ops_sampling
from rlhf_fast.reference import sampling as ref


def _margin_ok(logits, temperature, top_k, top_p, rel=1e-9):
    """False when some row's top-p decision is within rounding: a token whose float64 mass above
    (with float32 or float64 exps) is within ``rel * S`` of top_p * S."""
    if top_p >= 1.0:
        return True
    z = logits.float() / temperature
    for r in range(z.shape[0]):
        row = z[r]
        m = row.max()
        if not torch.isfinite(m) or torch.isnan(row).any():
            continue
        kth = torch.sort(row, descending=True).values[top_k - 1] if 0 < top_k < row.numel() else -math.inf
        vals = torch.sort(row[row >= kth], descending=True, stable=True).values
        for e in (torch.exp(vals - m).double(), torch.exp(vals.double() - m.double())):
            S = e.sum()
            above = torch.cumsum(e, 0) - e
            if ((above - top_p * S).abs() <= rel * S + 1e-300).any():
                return False
    return True


def _same_set(logits, temperature, cut_a, cut_b):
    z = _filter.scaled_logits(logits, temperature)
    return torch.equal(_filter.kept_mask(z, *cut_a), _filter.kept_mask(z, *cut_b))


@st.composite
def rows(draw, max_v=400):
    N = draw(st.integers(1, 4))
    V = draw(st.integers(1, max_v))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.01, 0.3, 1.0, 3.0, 12.0]))
    x = torch.randn(N, V, generator=g) * scale
    if draw(st.booleans()):  # ties
        x = (x * 2).round() / 2
    if draw(st.booleans()) and V > 1:  # -inf tokens (blocked ids, masked vocabulary)
        x[:, :: draw(st.integers(2, 5))] = -math.inf
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    top_k = draw(st.sampled_from([0, 1, 2, 7, 50, V - 1, V, V + 3]))
    top_p = draw(st.sampled_from([1.0, 0.99, 0.9, 0.5, 0.1]))
    temperature = draw(st.sampled_from([1.0, 0.7, 1.3]))
    return x.to(dtype), max(top_k, 0), top_p, temperature


@given(rows())
@settings(max_examples=150, deadline=None)
@example((torch.zeros(1, 643), 1, 0.5, 1.0))  # one value everywhere: the ties decide alone
@example((torch.tensor([[3.0, -math.inf, 1.0, 3.0, -math.inf, 0.5, -math.inf, 2.0, -math.inf, 3.0]]), 7, 0.8, 1.0))
def test_kept_cut_matches_its_definition(case):
    x, top_k, top_p, temperature = case
    assume(_filter.filter_active(top_k, top_p, x.shape[-1]))
    assume(_margin_ok(x, temperature, top_k, top_p))
    want = ref.kept_cut(x, temperature, top_k, top_p)
    got = _filter.kept_cut(x, temperature, top_k, top_p)
    twin = _filter.kept_cut_torch(x, temperature, top_k, top_p)
    assert _same_set(x, temperature, got, want), (got, want)
    assert _same_set(x, temperature, twin, want), (twin, want)


@pytest.mark.parametrize("scale", [0.5, 2.0, 10.0])  # flat (histogram path) .. peaked (candidates)
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.5), (20, 0.9), (6000, 0.95), (6000, 1.0), (0, 0.999)])
def test_kept_cut_at_a_real_vocabulary(scale, top_k, top_p):
    V = 151_936
    x = torch.randn(2, V, generator=torch.Generator().manual_seed(7)) * scale
    x[1, 5000:5100] = x[1].max()  # ties at the top
    assert _margin_ok(x, 1.0, top_k, top_p)  # well-conditioned at this seed
    want = ref.kept_cut(x, 1.0, top_k, top_p, e_dtype=torch.float32)
    got = _filter.kept_cut(x, 1.0, top_k, top_p)
    assert _same_set(x, 1.0, got, want)
    assert _same_set(x, 1.0, _filter.kept_cut_torch(x, 1.0, top_k, top_p), want)


@st.composite
def large_rows(draw):
    """Rows of V >= 16,384 (csrc/kept_cut.h kMinBracketV), where top-p tries the sampled bracket."""
    V = draw(st.integers(16_384, 24_000))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(2, V, generator=g) * draw(st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.0]))
    if draw(st.booleans()):  # ties, also inside the bracket
        x = (x * 8).round() / 8
    if draw(st.booleans()):
        x[:, :: draw(st.integers(2, 7))] = -math.inf
    top_k = draw(st.sampled_from([0, 0, 300, 6000]))
    top_p = draw(st.sampled_from([0.5, 0.8, 0.9, 0.97]))
    return x.to(draw(st.sampled_from([torch.float32, torch.bfloat16]))), top_k, top_p, draw(st.sampled_from([1.0, 0.7]))


@given(large_rows())
@settings(max_examples=25, deadline=None)
def test_kept_cut_at_large_vocabularies_matches_its_definition(case):
    """Every way of csrc/kept_cut.h (candidates, the sampled bracket, the full histogram) keeps the
    rule's set; the ways the examples took are checked to include the bracket in
    test_each_way_of_the_cut_is_taken."""
    x, top_k, top_p, temperature = case
    assume(_margin_ok(x, temperature, top_k, top_p))
    want = ref.kept_cut(x, temperature, top_k, top_p)
    got = _filter.kept_cut(x, temperature, top_k, top_p)
    assert _same_set(x, temperature, got, want), torch.ops.rlhf_fast.kept_cut_path(x, temperature, top_k, top_p)


@pytest.mark.skipif(not _library.extension_loaded(), reason="the ways are the C++ kernel's")
@pytest.mark.parametrize("V", [20_000, 151_936])
def test_each_way_of_the_cut_is_taken(V):
    """Flat rows fall back to the histogram, rows in between take the bracket, peaked rows stop among
    the candidates: each on the rule's set (against the sorted float64 definition)."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(2, V, generator=g) * s for s in (0.3, 2.0, 8.0)])
    ways = {}
    for top_p in (0.5, 0.9):
        paths = torch.ops.rlhf_fast.kept_cut_path(x, 1.0, 0, top_p).tolist()
        ways.update({p: top_p for p in paths})
        assert _margin_ok(x, 1.0, 0, top_p)
        want = ref.kept_cut(x, 1.0, 0, top_p, e_dtype=torch.float32)
        assert _same_set(x, 1.0, _filter.kept_cut(x, 1.0, 0, top_p), want), paths
    assert {1, 2, 4} <= set(ways), ways  # candidates, bracket, histogram
    assert torch.ops.rlhf_fast.kept_cut_path(x, 1.0, 20, 1.0).tolist() == [1] * 6  # top-k: the candidates
    assert torch.ops.rlhf_fast.kept_cut_path(x, 1.0, 0, 1.0).tolist() == [0] * 6  # filter off


def test_nan_and_infinite_rows_keep_everything():
    x = torch.randn(4, 50)
    x[0, 3] = math.nan
    x[1] = -math.inf
    x[2, 7] = math.inf
    v, i = _filter.kept_cut(x, 1.0, 5, 0.9)
    assert torch.all(v[:3] == -math.inf) and torch.all(i[:3] == 49)
    tv, ti = _filter.kept_cut_torch(x, 1.0, 5, 0.9)
    assert torch.equal(v[:3], tv[:3]) and torch.equal(i[:3], ti[:3])
    assert torch.isfinite(v[3])


def test_cpp_schema_matches_python_mirror():
    for name, schema in ops_sampling.SCHEMAS.items():
        op = getattr(torch.ops.rlhf_fast, name).default
        assert str(op._schema) == str(torch._C.parse_schema("rlhf_fast::" + schema))


@given(rows(max_v=700), st.booleans(), st.integers(0, 2**40))
@settings(max_examples=100, deadline=None)
def test_sample_tokens_matches_its_torch_twin_and_the_inverse_cdf(case, do_sample, seed):
    x, top_k, top_p, temperature = case
    B, V = x.shape
    assume(_margin_ok(x, temperature, top_k, top_p))
    finite = torch.isfinite(x.float()).any(-1) & ~torch.isnan(x.float()).any(-1)
    assume(bool(finite.all()))
    u = torch.rand(B, generator=torch.Generator().manual_seed(seed % 2**31), dtype=torch.float64)
    args = (float(temperature), int(top_k), float(top_p), do_sample)
    tok, lp = torch.ops.rlhf_fast.sample_tokens(x, u, *args)
    tok_t, lp_t = ops_sampling._sample_torch(x, u, *args)
    # the reference distribution over the same kept set, float64, and its inverse CDF at u
    cut = ref.kept_cut(x, temperature, top_k, top_p)
    z = _filter.scaled_logits(x, temperature).double()
    logp = torch.log_softmax(z.masked_fill(~_filter.kept_mask(z.float(), *cut), -math.inf), -1)
    if do_sample:
        want, cdf = ref.inverse_cdf(logp, u)
        # a draw within rounding of a CDF step may go either way
        near = ((cdf - (u * cdf[:, -1]).unsqueeze(-1)).abs() < 1e-9).any(-1)
        assert torch.equal(tok[~near], want[~near]) and torch.equal(tok_t[~near], want[~near])
    else:
        assert torch.equal(tok, x.float().argmax(-1)) and torch.equal(tok_t, tok)
    want_lp = logp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp.double(), want_lp, rtol=0, atol=2e-6 * (1 + want_lp.abs().max().item()))
    torch.testing.assert_close(lp_t, lp, rtol=0, atol=2e-6 * (1 + lp.abs().max().item()))


@pytest.mark.parametrize("active", [None, True, False])
def test_blocked_ids_only_while_active(active):
    x = torch.zeros(3, 10)
    x[:, 4] = 5.0  # the argmax, blocked
    blocked = torch.tensor([4, 9])
    flag = None if active is None else torch.tensor([active])
    u = torch.full((3,), 0.5, dtype=torch.float64)
    for fn in (torch.ops.rlhf_fast.sample_tokens, ops_sampling._sample_torch):
        tok, lp = fn(x, u, 1.0, 0, 1.0, False, blocked, flag)
        assert torch.all(tok == (0 if active in (None, True) else 4)), fn
        tok, _ = fn(x, u, 1.0, 0, 1.0, True, blocked, flag)
        if active in (None, True):
            assert not torch.isin(tok, blocked).any()


def test_sample_tokens_names_bad_input():
    with pytest.raises(RuntimeError, match=r"logits must be \(N, V\)"):
        torch.ops.rlhf_fast.sample_tokens(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.float64), 1.0, 0, 1.0, True)
    with pytest.raises(RuntimeError, match=r"u must be \(B,\)"):
        torch.ops.rlhf_fast.sample_tokens(torch.zeros(2, 4), torch.zeros(3, dtype=torch.float64), 1.0, 0, 1.0, True)
    with pytest.raises(RuntimeError, match=r"blocked ids must be in \[0, V"):
        torch.ops.rlhf_fast.sample_tokens(torch.zeros(2, 4), torch.zeros(2, dtype=torch.float64), 1.0, 0, 1.0, True,
                                          torch.tensor([4]))
