"""``ppo.use_linear_logprobs: auto`` (issue 35): the LM head's log-probs through stored logits, in
row chunks that fit ``ppo.logits_budget_mb`` (each under activation checkpointing) when a call's
logits would exceed it, in one piece below it.

The rule at its boundary, the numbers (below the budget bit-identical to the stored path; above it,
each chunk the stored path on its rows, gradients included), the config values and their errors,
and the memory: above the budget no (tokens, V) logits tensor is allocated (the test fails with the
stored path). The first-minibatch ratio with a budget between two
micro-batches' sizes is exactly 1: tests/test_ppo_exactness.py ("auto budget" cases).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rlhf_fast.config as C
from rlhf_fast.models import Policy
from rlhf_fast.models.heads import (
    DEFAULT_LOGITS_BUDGET_MB, check_linear_logprob_mode, chunk_rows, logits_bytes, logprobs_from_hidden,
    use_fused_head,
)
from rlhf_fast.tasks import tiny_config

MB = 2**20


def _head(V, H, dtype=torch.float32):
    head = nn.Linear(H, V, bias=False).to(dtype)
    return head


# ---- the rule ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_auto_rule_at_the_budget(dtype, size):
    V, H = 1000, 8
    head = _head(V, H, dtype)
    budget_mb = 3 * V * size * 10 / MB  # exactly 30 rows of logits
    for shape, rows in [((30, H), None), ((31, H), 30), ((3, 10, H), None), ((2, 16, H), 30), ((0, H), None)]:
        hidden = torch.zeros(shape, dtype=dtype)
        assert chunk_rows("auto", hidden, head, budget_mb) == rows, shape
        assert chunk_rows(True, hidden, head, budget_mb) is None and chunk_rows(False, hidden, head, budget_mb) is None
        assert use_fused_head(True, hidden, head, budget_mb) is True
        assert use_fused_head("auto", hidden, head, budget_mb) is False and use_fused_head(False, hidden, head, 1) is False
    assert chunk_rows("auto", torch.zeros(5, H, dtype=dtype), head, 1e-9) == 1  # at least one row
    assert logits_bytes(31, V, dtype) == 31 * V * size


def test_default_budget_in_tokens_at_qwen2_vocabulary():
    # README: 441 tokens at V = 151,936 in float32, 883 in bf16, in one piece; more, in chunks of that many
    head = nn.Linear(2, 151936, bias=False)  # H = 2: the rule reads rows, V and the dtype only
    for dtype, last_whole in [(torch.float32, 441), (torch.bfloat16, 883)]:
        head = head.to(dtype)
        assert chunk_rows("auto", torch.zeros(last_whole, 2, dtype=dtype), head, DEFAULT_LOGITS_BUDGET_MB) is None
        assert chunk_rows("auto", torch.zeros(4096, 2, dtype=dtype), head, DEFAULT_LOGITS_BUDGET_MB) == last_whole


def test_bad_mode_or_budget_is_named():
    for bad in ("yes", 1, None, "Auto"):
        with pytest.raises(ValueError, match="use_linear_logprobs must be 'auto', True or False"):
            check_linear_logprob_mode(bad, 256.0)
    for bad in (0, -1.0, float("inf"), float("nan"), True, "256"):
        with pytest.raises(ValueError, match="logits_budget_mb must be a finite number > 0"):
            check_linear_logprob_mode("auto", bad)
    with pytest.raises(ValueError, match="use_linear_logprobs must be"):
        Policy.from_pretrained(tiny_config("gpt2", vocab_size=50), seed=0, use_linear_logprobs="sometimes")


# ---- the numbers: below the budget the stored path's bits, above it each chunk's -----------------

@pytest.mark.parametrize("return_entropy", [True, False])
def test_auto_gives_the_stored_paths_numbers(return_entropy):
    V, H = 500, 16
    g = torch.Generator().manual_seed(0)
    head = _head(V, H)
    with torch.no_grad():
        head.weight.normal_(0, 0.5, generator=g)
    hidden = torch.randn(4, 6, H, generator=g)
    labels = torch.randint(0, V, (4, 6), generator=g)
    kw = dict(temperature=0.8, return_entropy=return_entropy, top_p=0.9)

    def run(**mode):
        h = hidden.clone().requires_grad_(True)
        head.zero_grad(set_to_none=True)
        out = logprobs_from_hidden(h, head, labels, **mode, **kw)
        lp = out[0] if return_entropy else out
        loss = torch.where(torch.isfinite(lp), lp, 0.0).sum() + (out[1].sum() if return_entropy else 0.0)
        loss.backward()
        return [o.detach() for o in (out if return_entropy else (out,))], h.grad, head.weight.grad.clone()

    stored = run(use_linear_logprobs=False)
    whole = run(use_linear_logprobs="auto", logits_budget_mb=1.0)
    assert all(torch.equal(a, b) for a, b in zip(whole[0], stored[0]))
    assert torch.equal(whole[1], stored[1]) and torch.equal(whole[2], stored[2])
    chunked = run(use_linear_logprobs="auto", logits_budget_mb=7 * V * 4 / MB)  # chunks of 7 rows: 4 of 24
    # each chunk is the stored path on its rows: the per-row values match it, the weight gradient
    # is its sum over four chunks instead of one GEMM
    pieces = [logprobs_from_hidden(hidden.reshape(-1, H)[r:r + 7], head, labels.reshape(-1)[r:r + 7],
                                   use_linear_logprobs=False, **kw) for r in range(0, 24, 7)]
    for i, got in enumerate(chunked[0]):
        want = torch.cat([p[i] if return_entropy else p for p in pieces]).reshape(4, 6)
        assert torch.equal(got, want)
    torch.testing.assert_close(chunked[1], stored[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked[2], stored[2], rtol=0, atol=1e-5)


def test_policy_chunks_above_the_budget_only(monkeypatch):
    import rlhf_fast.models.heads as heads

    V = 64
    calls = []
    real = heads._stored_logprobs

    def spy(hidden, lm_head, labels, **kw):
        calls.append(tuple(hidden.shape[:-1]))
        return real(hidden, lm_head, labels, **kw)

    monkeypatch.setattr(heads, "_stored_logprobs", spy)
    policy = Policy.from_pretrained(tiny_config("gpt2", vocab_size=V), seed=0)
    assert policy.use_linear_logprobs == "auto" and policy.logits_budget_mb == DEFAULT_LOGITS_BUDGET_MB
    policy.logits_budget_mb = 10 * V * 4 / MB  # 10 rows of float32 logits
    ids = torch.randint(1, V, (3, 6))
    mask = torch.ones_like(ids)
    policy.logprobs(ids, mask, response_start=3)  # 3 x 3 = 9 rows: one piece
    assert calls == [(3, 3)]
    calls.clear()
    policy.logprobs(ids, mask, response_start=2)  # 3 x 4 = 12 rows: chunks of 10 and 2
    assert calls == [(10,), (2,)]
    calls.clear()
    policy.packing = True  # packed: the rows are the real targets only (models/policy.py _head_on_targets)
    mask[:, -1] = 0
    policy.logprobs(ids, mask, response_start=2)  # 3 x 3 targets = 9 rows: one piece
    assert calls == [(9,)]


# ---- the memory: no (tokens, V) tensor above the budget -------------------------------------------

def _peak_extra_bytes(fn) -> int:
    """Peak bytes allocated through torch's CPU allocator during ``fn`` beyond what existed before
    (the profiler's memory events; kernels' own malloc'd scratch is O(V) per thread and not seen)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: e["ts"])
    assert mem, "the profiler recorded no allocation"
    peak = run = 0
    for e in mem:
        run += int(e["args"]["Bytes"])
        peak = max(peak, run)
    return peak


@pytest.mark.parametrize("mode", ["auto", False])
def test_no_tokens_by_vocab_logits_above_the_budget(mode):
    """Forward and backward of a policy's log-probs at 1,024 and 2,048 tokens x V 4,000 (16 and 32 MB
    of float32 logits) with a 1 MB budget: under "auto" (row chunks of 65, each checkpointed) the
    peak grows by less than a quarter of the logits' growth (what grows is the model's own
    activations, ~2 KB per token here); the stored path (``False``, the old default) holds the logits
    and their gradient and grows by at least the logits' growth."""
    V = 4000
    cfg = tiny_config("gpt2", vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=300,
                      bos_token_id=1, eos_token_id=2)
    policy = Policy.from_pretrained(cfg, seed=0, use_linear_logprobs=mode, logits_budget_mb=1.0)
    peaks = []
    for T in (129, 257):
        ids = torch.randint(1, V, (8, T), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)

        def step():
            policy.zero_grad(set_to_none=True)
            policy.logprobs(ids, mask).logprobs.sum().backward()

        step()  # warm: parameters' gradients exist before the measured call
        peaks.append(_peak_extra_bytes(step))
    grown, logits_grown = peaks[1] - peaks[0], 8 * 128 * V * 4
    if mode == "auto":
        assert grown < logits_grown / 4, f"peaks {peaks} B in chunks; the logits grew by {logits_grown} B"
    else:
        assert grown >= logits_grown, f"the stored path should hold the logits, peaks {peaks} B"


# ---- the config ----------------------------------------------------------------------------------

def test_config_values_and_errors():
    cfg = C.load_config()
    assert cfg.ppo.use_linear_logprobs == "auto" and cfg.ppo.logits_budget_mb == DEFAULT_LOGITS_BUDGET_MB
    for text, value in [("auto", "auto"), ("true", True), ("false", False), ("on", True), ("no", False)]:
        assert C.load_config(overrides=["--ppo.use_linear_logprobs", text]).ppo.use_linear_logprobs is value \
            or C.load_config(overrides=["--ppo.use_linear_logprobs", text]).ppo.use_linear_logprobs == value
    assert C.load_config(overrides=["--ppo.logits_budget_mb", "64"]).ppo.logits_budget_mb == 64.0
    for bad in ("maybe", "1", "2"):
        with pytest.raises(ValueError, match=r"ppo.use_linear_logprobs: expected one of 'auto', True, False"):
            C.load_config(overrides=["--ppo.use_linear_logprobs", bad])
    for bad in ("0", "-5"):
        with pytest.raises(ValueError, match=r"ppo.logits_budget_mb.*> 0"):
            C.load_config(overrides=["--ppo.logits_budget_mb", bad])
    text = C.dump_yaml(C.load_config(overrides=["--ppo.use_linear_logprobs", "true"]))
    assert "use_linear_logprobs: true" in text and "logits_budget_mb: 256.0" in text
