"""gather_logprobs / linear_logprobs under the engine's sampling filter (top-k, top-p; issue 18).

Held to the float64 reference under the numerical contract (rlhf_fast.testing), outputs and
gradients: ties at the k-th logit, top_p near 0 and 1, k >= V, masked rows, -inf logits, labels
outside the kept set; the kept set is the engine's (rlhf_fast/_filter.py) and agrees with the
independent row-by-row rule of rlhf_fast.reference.sampling; filter off is bit-identical to the
unfiltered op; bad filters name the argument; engine rollout log-probs equal Policy.logprobs with
the filter at float32 rounding; the fused op (cut and sums in one, csrc/logprobs_filtered.cpp) on
each way its cut is found, and against kept_cut + gather_logprobs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

import rlhf_fast.ops as ops
import rlhf_fast.reference as ref
from rlhf_fast import _filter
from rlhf_fast.reference.sampling import filtered_logprobs
from rlhf_fast.testing import assert_no_worse_than_baseline

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _finite(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def check_filtered(fwd, ref_fn, inputs, labels, kw, *, return_entropy=True, seed=1, grad_atol=None):
    """fwd / ref_fn(*inputs, labels, **kw) on leaf copies; outputs and every input's gradient
    against the float64 reference, the float32 reference as the baseline. The loss uses the finite
    log-probs (a label outside the kept set is a constant -inf)."""
    g = torch.Generator().manual_seed(seed)
    g_lp = torch.randn(labels.shape, generator=g, dtype=torch.float64)
    g_h = torch.randn(labels.shape, generator=g, dtype=torch.float64)

    def run(fn, xs):
        xs = [x.detach().clone().requires_grad_(True) for x in xs]
        lp, h = fn(*xs, labels, return_entropy=True, **kw)
        loss = (_finite(lp.double()) * g_lp).sum() + ((h.double() * g_h).sum() if return_entropy else 0.0)
        loss.backward()
        return lp, h, [x.grad for x in xs]

    o_lp, o_h, o_g = run(lambda *a, **k: ref_fn(*a, **k), [x.double() for x in inputs])
    b_lp, b_h, b_g = run(lambda *a, **k: ref_fn(*a, compute_dtype=torch.float32, **k), inputs)
    c_lp, c_h, c_g = run(fwd, inputs)
    scale = 1.0 + float(_finite(o_lp.detach()).abs().max()) if o_lp.numel() else 1.0
    assert_no_worse_than_baseline("logprobs", c_lp, o_lp, b_lp, atol=2e-6 * scale)
    assert_no_worse_than_baseline("entropy", c_h, o_h, b_h, atol=2e-6 * (1.0 + math.log(inputs[0].shape[-1] + 1)))
    for i, (c, o, b) in enumerate(zip(c_g, o_g, b_g)):
        eps = torch.finfo(inputs[i].dtype).eps
        g_max = float(o.abs().max()) if o.numel() else 0.0
        atol = 4 * eps * 1e-3 + 1e-7 * (1.0 + g_max) if grad_atol is None else grad_atol(i, g_lp, g_h)
        assert_no_worse_than_baseline(f"grad[{i}]", c, o, b, atol=atol)
    return c_lp, c_h, c_g


def gather_case(B, T, V, dtype, *, scale=3.0, ties=False, ignore_frac=0.0, neg_inf=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, V, generator=g) * scale
    if ties:  # few distinct values: many ties at the k-th logit and at the top-p cut
        x = x.round()
    if neg_inf and V > 2:
        x[..., : V // 3] = float("-inf")
    labels = torch.randint(V // 3 if (neg_inf and V > 2) else 0, V, (B, T), generator=g)
    if ignore_frac:
        labels[torch.rand(B, T, generator=g) < ignore_frac] = IGNORE
    return x.to(dtype), labels


def _gather(x, labels, **kw):
    return ops.gather_logprobs(x, labels, ignore_index=IGNORE, **kw)


def _gather_ref(x, labels, **kw):
    return ref.gather_logprobs(x, labels, ignore_index=IGNORE, **kw)


PINNED = [
    # (B, T, V, top_k, top_p, case kwargs)
    (2, 3, 37, 5, 1.0, dict(ties=True)),  # ties at the k-th logit: all kept
    (2, 3, 37, 1, 1.0, dict(ties=True)),  # k = 1 with a tied max
    (1, 4, 50, 0, 1e-6, {}),  # top_p near 0: the argmax only
    (1, 4, 50, 0, 1e-6, dict(ties=True)),  # ... a tied argmax: the lowest id
    (2, 2, 300, 0, 1 - 1e-7, {}),  # top_p near 1
    (2, 3, 41, 0, 0.9, dict(ties=True)),  # a tie across the top-p cut: lower ids first
    (2, 3, 41, 7, 0.6, dict(ties=True)),
    (1, 3, 20, 20, 1.0, {}),  # k = V: off
    (1, 3, 20, 19, 1.0, {}),
    (2, 5, 64, 10, 0.8, dict(ignore_frac=0.5)),  # masked rows
    (2, 3, 30, 4, 0.7, dict(neg_inf=True)),
    (1, 2, 3000, 50, 0.95, dict(scale=5.0)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PINNED, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-k{c[3]}-p{c[4]}{''.join(sorted(c[5]))}")
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_pinned_gather(case, dtype, temperature):
    B, T, V, k, p, kw = case
    x, labels = gather_case(B, T, V, dtype, **kw)
    check_filtered(_gather, _gather_ref, [x], labels, dict(temperature=temperature, top_k=k, top_p=p))


@st.composite
def filtered_cases(draw, max_v=2049):
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    V = draw(st.one_of(st.integers(1, 40), st.sampled_from([127, 128, 341, 1000, max_v])))
    dtype = draw(st.sampled_from(DTYPES))
    temperature = draw(st.one_of(st.just(1.0), st.floats(0.25, 3.0)))
    top_k = draw(st.one_of(st.just(0), st.integers(1, 8), st.integers(V - 1, V + 2).filter(lambda k: k >= 0)))
    top_p = draw(st.one_of(st.just(1.0), st.floats(1e-6, 1.0, exclude_min=True), st.sampled_from([1e-6, 0.9, 1 - 1e-7])))
    kw = dict(scale=draw(st.sampled_from([0.1, 1.0, 5.0])), ties=draw(st.booleans()),
              ignore_frac=draw(st.sampled_from([0.0, 0.3])), neg_inf=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))
    note(f"B={B} T={T} V={V} {dtype} T={temperature} top_k={top_k} top_p={top_p} {kw}")
    return B, T, V, dtype, temperature, top_k, top_p, kw


@given(filtered_cases())
def test_property_gather(case):
    B, T, V, dtype, temperature, top_k, top_p, kw = case
    x, labels = gather_case(B, T, V, dtype, **kw)
    check_filtered(_gather, _gather_ref, [x], labels, dict(temperature=temperature, top_k=top_k, top_p=top_p))


def linear_case(N, H, V, dtype, *, dup=0, seed=0):
    """Hidden states and weights on a 1/8 grid with small H: hidden @ weight.T is exact in float32
    and float64, so the op and the float64 reference decide the kept set on the same logits.
    ``dup`` weight rows copy earlier ones: exact ties between tokens."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-8, 9, (N, H), generator=g) / 8.0
    w = torch.randint(-8, 9, (V, H), generator=g) / 8.0
    if dup:
        w[V - dup :] = w[:dup]
    labels = torch.randint(0, V, (N,), generator=g)
    return h.to(dtype), w.to(dtype), labels


def linear_grad_atol(h, w, labels, temperature, top_k, top_p):
    """The d(hidden) / d(weight) tolerance of tests/test_linear_logprobs.py (four float32 ulps of the
    condition number of dZ @ W and dZ.T @ X, plus the logits' own rounding) with p the filtered
    distribution: a dropped token has p = 0 and adds nothing. The grid inputs of ``linear_case`` make
    the logits exact, so only the first term matters here."""

    def atol(i, g_lp, g_h):
        V = w.shape[0]
        z = (h.double() @ w.double().T) / temperature
        kept = _filter.filter_logits(_filter.scaled_logits(h.float() @ w.float().T, temperature), top_k, top_p) > -math.inf
        logp = torch.log_softmax(z.masked_fill(~kept, -math.inf), -1)
        p = logp.exp()
        logp_abs = torch.where(kept, logp.abs(), 0.0)
        ent = -(p * torch.where(kept, logp, 0.0)).sum(-1, keepdim=True)
        y = labels.reshape(-1, 1)
        valid = (y != IGNORE).double()
        onehot = torch.zeros_like(p).scatter_(-1, y.clamp(0, V - 1), 1.0)
        dzc = (g_lp.reshape(-1, 1).abs() * valid * (onehot + p) + g_h.reshape(-1, 1).abs() * p * (logp_abs + ent))
        dzc = dzc / temperature
        cond = dzc @ w.double().abs() if i == 0 else dzc.T @ h.double().abs()
        return 4 * torch.finfo(torch.float32).eps * float(cond.max()) + 1e-7

    return atol


def _check_linear(h, w, labels, temperature, top_k, top_p):
    check_filtered(lambda hh, ww, y, **kw: ops.linear_logprobs(hh, ww, y, ignore_index=IGNORE, **kw),
                   lambda hh, ww, y, **kw: ref.linear_logprobs(hh, ww, y, ignore_index=IGNORE, **kw),
                   [h, w], labels, dict(temperature=temperature, top_k=top_k, top_p=top_p),
                   grad_atol=linear_grad_atol(h, w, labels, temperature, top_k, top_p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("top_k,top_p,dup", [(5, 1.0, 10), (0, 0.9, 10), (6, 0.7, 12), (0, 1e-6, 0), (64, 1.0, 0)])
def test_linear_filtered(dtype, top_k, top_p, dup):
    h, w, labels = linear_case(9, 6, 64, dtype, dup=dup)
    labels[2] = IGNORE
    _check_linear(h, w, labels, 0.7, top_k, top_p)


@given(st.data())
def test_property_linear(data):
    N, H = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 8))
    V = data.draw(st.one_of(st.integers(2, 40), st.sampled_from([127, 300])))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]))
    top_k = data.draw(st.one_of(st.just(0), st.integers(1, V + 1)))
    top_p = data.draw(st.one_of(st.just(1.0), st.floats(1e-6, 1.0, exclude_min=True)))
    temperature = data.draw(st.sampled_from([1.0, 0.7, 2.0]))
    dup, seed = data.draw(st.integers(0, V // 2)), data.draw(st.integers(0, 2**16))
    note(f"N={N} H={H} V={V} {dtype} top_k={top_k} top_p={top_p} T={temperature} dup={dup} seed={seed}")
    h, w, labels = linear_case(N, H, V, dtype, dup=dup, seed=seed)
    _check_linear(h, w, labels, temperature, top_k, top_p)


def test_linear_filtered_matches_gather_over_chunks(monkeypatch):
    """Rows in several CPU chunks: the cut pre-pass and the kernel see the same chunked logits."""
    import sys

    lin = sys.modules["rlhf_fast.ops.linear_logprobs"]  # the package attribute is the function
    h, w, labels = linear_case(13, 5, 40, torch.float32, dup=8, seed=3)
    monkeypatch.setattr(lin, "CPU_CHUNK_BYTES", 4 * 40 * 4)  # 4 rows per chunk
    monkeypatch.setattr(lin, "CPU_MIN_ROWS", 1)
    kw = dict(temperature=0.9, top_k=9, top_p=0.8, return_entropy=True)
    a = ops.linear_logprobs(h, w, labels, **kw)
    b = ops.gather_logprobs(h @ w.T, labels, **kw)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_filtered_without_graph_forms_each_chunk_once(monkeypatch, dtype):
    """A call that builds no graph (old log-probs, reference) finds each chunk's cut on the logits it
    then reduces: one GEMM per chunk instead of two (issue 35), and the bits of the call with autograd."""
    import sys

    lin = sys.modules["rlhf_fast.ops.linear_logprobs"]  # the package attribute is the function
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(13, 24, generator=g).to(dtype), torch.randn(300, 24, generator=g).to(dtype)
    labels = torch.randint(0, 300, (13,), generator=g)
    labels[::2] = (h.float() @ w.float().T).argmax(-1)[::2]  # kept: every other row's top token
    monkeypatch.setattr(lin, "CPU_CHUNK_BYTES", 4 * 300 * 4)  # 4 rows per chunk: 4 chunks
    monkeypatch.setattr(lin, "CPU_MIN_ROWS", 1)
    calls = []
    real = lin._logits_chunk
    monkeypatch.setattr(lin, "_logits_chunk", lambda *a: calls.append(1) or real(*a))
    kw = dict(temperature=0.7, top_k=40, top_p=0.9, return_entropy=True)
    with torch.no_grad():
        old = ops.linear_logprobs(h, w, labels, **kw)
    assert len(calls) == 4
    new = ops.linear_logprobs(h.requires_grad_(), w, labels, **kw)  # pre-pass + op: 8 GEMMs
    assert len(calls) == 4 + 8
    assert torch.equal(old[0], new[0].detach()) and torch.equal(old[1], new[1].detach())
    assert torch.isinf(old[0]).any() and torch.isfinite(old[0]).any()  # the filter cut some labels, kept others


@pytest.mark.parametrize("return_entropy", [False, True])
def test_filter_off_is_bit_identical(return_entropy):
    x, labels = gather_case(3, 4, 129, torch.bfloat16, ignore_frac=0.3, seed=5)
    h, w, y = linear_case(7, 6, 50, torch.float32, seed=6)
    for off in (dict(), dict(top_k=0, top_p=1.0), dict(top_k=129), dict(top_k=500)):
        outs = []
        for kw in (dict(), off):
            xx = x.clone().requires_grad_(True)
            r = ops.gather_logprobs(xx, labels, temperature=0.8, return_entropy=return_entropy, ignore_index=IGNORE, **kw)
            r = r if return_entropy else (r,)
            sum(t.sum() for t in r).backward()
            hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
            kw_lin = {k: (min(v, 50) if k == "top_k" else v) for k, v in kw.items()}
            q = ops.linear_logprobs(hh, ww, y, temperature=0.8, return_entropy=return_entropy, **kw_lin)
            q = q if return_entropy else (q,)
            sum(t.sum() for t in q).backward()
            outs.append([*r, xx.grad, *q, hh.grad, ww.grad])
        assert all(torch.equal(a, b) for a, b in zip(*outs)), off


def test_label_outside_kept_set_is_minus_inf_without_gradient():
    x = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    labels = torch.tensor([4])
    xx = x.clone().requires_grad_(True)
    lp = ops.gather_logprobs(xx, labels, top_k=2)
    assert lp.item() == -math.inf
    lp.sum().backward()
    assert torch.equal(xx.grad, torch.zeros_like(x))
    xx.grad = None  # entropy's gradient flows through the two kept logits only
    _, h = ops.gather_logprobs(xx, labels, top_k=2, return_entropy=True)
    h.backward()
    assert xx.grad[0, 2:].eq(0).all() and xx.grad[0, :2].ne(0).all()


@pytest.mark.parametrize("V,top_k,top_p", [(31, 5, 1.0), (31, 0, 0.8), (31, 4, 0.5), (200, 20, 0.9)])
def test_kept_set_is_the_engine_rule(V, top_k, top_p):
    """The op's support equals the engine's filter on the same scaled logits, and the independent
    row-by-row reference sampler (rlhf_fast.reference.sampling) on tie-heavy integer logits."""
    g = torch.Generator().manual_seed(V + top_k)
    x = (torch.randn(16, V, generator=g) * 2).round()
    labels = torch.arange(V).repeat(16, 1)  # every token of every row
    lp = ops.gather_logprobs(x[:, None, :].expand(16, V, V), labels, temperature=0.5, top_k=top_k, top_p=top_p)
    support = torch.isfinite(lp)
    engine = _filter.filter_logits(x / 0.5, top_k, top_p) > -math.inf
    assert torch.equal(support, engine)
    independent = torch.isfinite(filtered_logprobs(x, temperature=0.5, top_k=top_k, top_p=top_p))
    assert torch.equal(support, independent)
    torch.testing.assert_close(lp, filtered_logprobs(x, temperature=0.5, top_k=top_k, top_p=top_p).float(),
                               rtol=0, atol=2e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p="0.9"), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
])
def test_bad_filter_names_the_argument(bad, match):
    x, labels = gather_case(1, 2, 10, torch.float32)
    with pytest.raises(ValueError, match=match):
        ops.gather_logprobs(x, labels, **bad)
    with pytest.raises(ValueError, match=match):
        ops.linear_logprobs(torch.randn(2, 4), torch.randn(10, 4), labels[0], **bad)
    with pytest.raises(ValueError, match=match):
        ref.gather_logprobs(x, labels, **bad)


@pytest.mark.parametrize("use_linear", [False, True])
def test_engine_rollout_logprobs_equal_policy_logprobs_with_filter(use_linear):
    """HybridEngine samples at top_p 0.9 / top_k 20 and returns the log-probs it sampled with;
    Policy.logprobs with the same filter recomputes them (the trainer's forward) to float32
    rounding, and every sampled token is in the trainer's kept set."""
    from rlhf_fast.engine import HybridEngine, SamplingParams
    from rlhf_fast.models import Policy
    from rlhf_fast.tasks import tiny_config

    V, P = 97, 7
    policy = Policy.from_pretrained(tiny_config("gpt2", vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                                    seed=1, use_linear_logprobs=use_linear)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (6, P), generator=g)
    mask = (torch.arange(P) >= torch.randint(0, P - 1, (6,), generator=g)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    out = HybridEngine(policy.model, pad_token_id=0, max_batch_size=6, max_seq_len=P + 12).generate(ids, mask, params)
    seq_mask = torch.cat([mask.bool(), out.response_mask], 1)
    lp = policy.logprobs(out.sequences, seq_mask, temperature=0.7, top_k=20, top_p=0.9, response_start=P).logprobs
    m = out.response_mask
    assert torch.isfinite(lp[m]).all()
    gap = (lp - out.logprobs)[m].abs().max().item()
    assert gap <= 1e-5, gap
    # and the unfiltered log-probs are measurably different: the filter is really applied
    full = policy.logprobs(out.sequences, seq_mask, temperature=0.7, response_start=P).logprobs
    assert (full - out.logprobs)[m].abs().max().item() > 1e-3


# ---- the kernels behind the op: Triton (interpreter on CPU) and the no-compiler fallback --------

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (conftest)


def _kernel_op(fwd, bwd, device="cpu"):
    """fwd / bwd (the launchers' signatures) behind an autograd.Function, with the cut found as
    the public op finds it."""

    def op(x, labels, *, return_entropy, temperature, top_k, top_p):
        x, labels = x.to(device), labels.to(device)
        cut = _filter.kept_cut(x.detach(), temperature, top_k, top_p)
        cv, ci = cut if cut is not None else (None, None)

        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, logits):
                lp, h, stats = fwd(logits, labels, temperature, True, IGNORE, cv, ci)
                ctx.save_for_backward(logits, stats, h)
                return lp, h

            @staticmethod
            def backward(ctx, g_lp, g_h):
                logits, stats, h = ctx.saved_tensors
                return bwd(g_lp, g_h, logits, labels, stats, h, temperature, IGNORE, cv, ci)

        lp, h = Fn.apply(x)
        return lp.cpu(), h.cpu()

    return op


@pytest.mark.triton
@pytest.mark.parametrize("case", [c for c in PINNED if c[2] <= 300],
                         ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-k{c[3]}-p{c[4]}{''.join(sorted(c[5]))}")
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_pinned_triton(case, temperature):
    from rlhf_fast.kernels import logprobs as k

    B, T, V, top_k, top_p, kw = case
    x, labels = gather_case(B, T, V, torch.bfloat16, **kw)
    check_filtered(_kernel_op(k.gather_logprobs_fwd, k.gather_logprobs_bwd, TRITON_DEVICE), _gather_ref, [x], labels,
                   dict(temperature=temperature, top_k=top_k, top_p=top_p))


@pytest.mark.triton
def test_triton_multi_block_row_filtered():
    """V larger than one interpreter block: the kept test and the online sums across chunks."""
    from rlhf_fast.kernels import logprobs as k

    x, labels = gather_case(1, 2, 40000, torch.float32, scale=5.0, ties=True, seed=2)
    assert k._launch_config(40000, torch.device(TRITON_DEVICE))[0] < 40000
    check_filtered(_kernel_op(k.gather_logprobs_fwd, k.gather_logprobs_bwd, TRITON_DEVICE), _gather_ref, [x], labels,
                   dict(temperature=0.9, top_k=30, top_p=0.5))


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.9), (7, 0.6)])
def test_fallback_filtered(top_k, top_p):
    from rlhf_fast.ops import logprobs as ops_logprobs

    x, labels = gather_case(2, 5, 77, torch.bfloat16, ties=True, ignore_frac=0.3)
    check_filtered(_kernel_op(ops_logprobs._fwd_torch, ops_logprobs._bwd_torch), _gather_ref, [x], labels,
                   dict(temperature=0.7, top_k=top_k, top_p=top_p))


def test_opcheck_with_cut():
    logits = torch.randn(2, 3, 37, requires_grad=True)
    labels = torch.randint(0, 37, (2, 3))
    labels[0, 0] = IGNORE
    cv, ci = _filter.kept_cut(logits.detach(), 0.7, 5, 0.8)
    torch.library.opcheck(torch.ops.rlhf_fast.gather_logprobs.default, (logits, labels, 0.7, True, IGNORE, cv, ci))
    _, _, stats = torch.ops.rlhf_fast.gather_logprobs(logits.detach(), labels, 0.7, True, IGNORE, cv, ci)
    torch.library.opcheck(
        torch.ops.rlhf_fast.gather_logprobs_backward.default,
        (torch.randn(2, 3), torch.randn(2, 3), logits.detach(), labels, stats, torch.rand(2, 3), 0.7, IGNORE, cv, ci),
    )
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(37, 8, requires_grad=True)
    cv, ci = _filter.kept_cut((h @ w.T).detach(), 0.7, 5, 0.8)
    torch.library.opcheck(torch.ops.rlhf_fast.linear_logprobs.default,
                          (h, w, labels.reshape(-1), 0.7, True, IGNORE, cv, ci))


def _mixed_rows(V, seed=3):
    """(1, 6, V) logits: flat, in-between and peaked rows, two of each (csrc/kept_cut.h's three ways)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(2, V, generator=g) * s for s in (0.3, 2.0, 8.0)]).unsqueeze(0)
    labels = torch.randint(0, V, (1, 6), generator=g)
    labels[0, ::2] = x[0, ::2].argmax(-1)  # kept whatever the filter: finite log-probs on every way
    return x, labels


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (0, 0.9), (300, 0.9), (20, 1.0)])
def test_fused_filtered_op_against_the_reference_on_every_way(top_k, top_p):
    """gather_logprobs_filtered (csrc/logprobs_filtered.cpp) sums the kept set where the cut was found:
    among the candidates, in the sampled bracket, or in a pass over the row; each held to the float64
    reference, outputs and gradients (the ways taken are asserted where the C++ kernel runs)."""
    from rlhf_fast.ops import _library

    x, labels = _mixed_rows(20_000)
    labels[0, 3] = IGNORE
    if _library.extension_loaded() and top_p < 1.0:
        ways = set(torch.ops.rlhf_fast.kept_cut_path(x[0], 1.0, top_k, top_p).tolist())
        # top-k 300: every kept token is among the 301 collected; top-p alone: the bracket at 0.5, the histogram at 0.9
        assert ways == ({1} if top_k else {1, 2} if top_p == 0.5 else {1, 4}), ways
    kw = dict(temperature=1.0, top_k=top_k, top_p=top_p)
    check_filtered(_gather, _gather_ref, [x], labels, kw)
    # without the entropy a flat row's kept mass is the histogram walk's (no pass over the row)
    lp = _gather(x, labels, **kw)
    want, base = _gather_ref(x.double(), labels, **kw), _gather_ref(x, labels, compute_dtype=torch.float32, **kw)
    scale = 1.0 + float(_finite(want).abs().max())
    assert_no_worse_than_baseline("logprobs without entropy", lp, want, base, atol=2e-6 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_filtered_op_keeps_the_cut_of_kept_cut(dtype, temperature):
    """One op or two (kept_cut, then gather_logprobs with its cut): the same cut bit for bit, the same
    log-probs and entropy to float32 rounding (the kept sums are added in another order)."""
    x, labels = _mixed_rows(20_000)
    x = x.to(dtype)
    for top_k, top_p in [(0, 0.9), (0, 0.5), (50, 0.9), (20, 1.0)]:
        lp, ent, stats, cv, ci = torch.ops.rlhf_fast.gather_logprobs_filtered(x, labels, temperature, True, IGNORE,
                                                                              top_k, top_p)
        want_cut = _filter.kept_cut(x, temperature, top_k, top_p)
        assert torch.equal(cv, want_cut[0]) and torch.equal(ci, want_cut[1])
        lp2, ent2, stats2 = torch.ops.rlhf_fast.gather_logprobs(x, labels, temperature, True, IGNORE, *want_cut)
        assert torch.equal(torch.isfinite(lp), torch.isfinite(lp2))
        fin = torch.isfinite(lp2)
        torch.testing.assert_close(lp[fin], lp2[fin], rtol=0, atol=4e-6 * (1 + float(lp2[fin].abs().max())))
        torch.testing.assert_close(ent, ent2, rtol=0, atol=4e-6 * (1 + math.log(x.shape[-1])))
        assert torch.equal(stats[..., 0], stats2[..., 0])
        lp3 = torch.ops.rlhf_fast.gather_logprobs_filtered(x, labels, temperature, False, IGNORE, top_k, top_p)[0]
        torch.testing.assert_close(lp3[fin], lp2[fin], rtol=0, atol=4e-6 * (1 + float(lp2[fin].abs().max())))


def test_opcheck_fused_filtered():
    logits = torch.randn(2, 3, 37, requires_grad=True)
    labels = torch.randint(0, 37, (2, 3))
    labels[0, 0] = IGNORE
    torch.library.opcheck(torch.ops.rlhf_fast.gather_logprobs_filtered.default,
                          (logits, labels, 0.7, True, IGNORE, 5, 0.8))


def test_torch_compile_fullgraph_filtered():
    def f(logits, labels):
        lp, h = ops.gather_logprobs(logits, labels, temperature=0.7, return_entropy=True, top_k=6, top_p=0.9)
        return (_finite(lp) + 0.01 * h).sum()

    logits = torch.randn(2, 4, 33, requires_grad=True)
    labels = torch.randint(0, 33, (2, 4))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(logits, labels)
    out.backward()
    g = logits.grad.clone()
    logits.grad = None
    eager = f(logits, labels)
    eager.backward()
    assert torch.equal(out, eager) and torch.equal(g, logits.grad)
