"""``ppo.use_linear_logprobs: auto`` (issue 35): the LM head's log-probs through the fused op when a
call's logits would exceed ``ppo.logits_budget_mb``, through stored logits below it.

The rule at its boundary, the numbers of each side (bit-identical to the path it picks), the config
values and their errors, and the memory: above the budget no (tokens, V) logits tensor is allocated
(the test fails with the stored path). The first-minibatch ratio with a budget between two
micro-batches' sizes is exactly 1: tests/test_ppo_exactness.py ("auto budget" cases).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

import rlhf_fast.config as C
from rlhf_fast.models import Policy
from rlhf_fast.models.heads import (
    DEFAULT_LOGITS_BUDGET_MB, check_linear_logprob_mode, logits_bytes, logprobs_from_hidden, use_fused_head,
)
from rlhf_fast.tasks import tiny_config

lin = importlib.import_module("rlhf_fast.ops.linear_logprobs")
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
    for shape, fused in [((30, H), False), ((31, H), True), ((3, 10, H), False), ((2, 16, H), True), ((0, H), False)]:
        hidden = torch.zeros(shape, dtype=dtype)
        assert use_fused_head("auto", hidden, head, budget_mb) is fused, shape
        assert use_fused_head(True, hidden, head, budget_mb) is True
        assert use_fused_head(False, hidden, head, budget_mb) is False
    assert logits_bytes(31, V, dtype) == 31 * V * size


def test_default_budget_in_tokens_at_qwen2_vocabulary():
    # README: 441 tokens at V = 151,936 in float32, 883 in bf16, stored; more, fused
    head = nn.Linear(2, 151936, bias=False)  # H = 2: the rule reads rows, V and the dtype only
    for dtype, last_stored in [(torch.float32, 441), (torch.bfloat16, 883)]:
        head = head.to(dtype)
        assert not use_fused_head("auto", torch.zeros(last_stored, 2, dtype=dtype), head, DEFAULT_LOGITS_BUDGET_MB)
        assert use_fused_head("auto", torch.zeros(last_stored + 1, 2, dtype=dtype), head, DEFAULT_LOGITS_BUDGET_MB)


def test_bad_mode_or_budget_is_named():
    for bad in ("yes", 1, None, "Auto"):
        with pytest.raises(ValueError, match="use_linear_logprobs must be 'auto', True or False"):
            check_linear_logprob_mode(bad, 256.0)
    for bad in (0, -1.0, float("inf"), float("nan"), True, "256"):
        with pytest.raises(ValueError, match="logits_budget_mb must be a finite number > 0"):
            check_linear_logprob_mode("auto", bad)
    with pytest.raises(ValueError, match="use_linear_logprobs must be"):
        Policy.from_pretrained(tiny_config("gpt2", vocab_size=50), seed=0, use_linear_logprobs="sometimes")


# ---- the numbers: each side is bit-identical to the path it picks -----------------------------------

def test_auto_gives_the_picked_paths_bits():
    V, H = 500, 16
    g = torch.Generator().manual_seed(0)
    head = _head(V, H)
    with torch.no_grad():
        head.weight.normal_(0, 0.5, generator=g)
    hidden = torch.randn(4, 6, H, generator=g)
    labels = torch.randint(0, V, (4, 6), generator=g)
    kw = dict(temperature=0.8, return_entropy=True)
    stored = logprobs_from_hidden(hidden, head, labels, use_linear_logprobs=False, **kw)
    fused = logprobs_from_hidden(hidden, head, labels, use_linear_logprobs=True, **kw)
    small = logprobs_from_hidden(hidden, head, labels, use_linear_logprobs="auto", logits_budget_mb=1.0, **kw)
    large = logprobs_from_hidden(hidden, head, labels, use_linear_logprobs="auto", logits_budget_mb=1e-3, **kw)
    for a, b in [(small, stored), (large, fused)]:
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_policy_calls_the_fused_op_above_the_budget_only(monkeypatch):
    import rlhf_fast.ops as ops

    V, H = 64, 32
    calls = []
    real = ops.linear_logprobs

    def spy(hidden, weight, labels, **kw):
        calls.append(tuple(hidden.shape))
        return real(hidden, weight, labels, **kw)

    monkeypatch.setattr(ops, "linear_logprobs", spy)
    policy = Policy.from_pretrained(tiny_config("gpt2", vocab_size=V), seed=0)
    assert policy.use_linear_logprobs == "auto" and policy.logits_budget_mb == DEFAULT_LOGITS_BUDGET_MB
    policy.logits_budget_mb = 10 * V * 4 / MB  # 10 rows of float32 logits
    ids = torch.randint(1, V, (3, 6))
    mask = torch.ones_like(ids)
    policy.logprobs(ids, mask, response_start=3)  # 3 x 3 = 9 rows: stored
    assert calls == []
    policy.logprobs(ids, mask, response_start=2)  # 3 x 4 = 12 rows: fused
    assert calls == [(3, 4, H)]
    policy.packing = True  # packed: the rows are the real targets only (models/policy.py _head_on_targets)
    mask[:, -1] = 0
    policy.logprobs(ids, mask, response_start=2)  # 3 x 3 targets = 9 rows: stored
    assert calls == [(3, 4, H)]


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
def test_no_tokens_by_vocab_logits_above_the_budget(monkeypatch, mode):
    """Forward and backward of a policy's log-probs at 1,024 tokens x V 4,000 (16 MB of float32
    logits) with a 1 MB budget: "auto" stays under a quarter of the logits' bytes (its row chunks are
    16 rows; the rest is the (V, H) gradients and the activations); the stored path (``False``, the
    old default) holds the logits and their gradient and fails that bound."""
    monkeypatch.setattr(lin, "CPU_CHUNK_BYTES", 16 * 4000 * 4)
    monkeypatch.setattr(lin, "CPU_MIN_ROWS", 1)
    V = 4000
    cfg = tiny_config("gpt2", vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=256,
                      bos_token_id=1, eos_token_id=2)
    policy = Policy.from_pretrained(cfg, seed=0,
                                    use_linear_logprobs=mode, logits_budget_mb=1.0)
    ids = torch.randint(1, V, (8, 129), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    logits = 8 * 128 * V * 4

    def step():
        policy.zero_grad(set_to_none=True)
        policy.logprobs(ids, mask).logprobs.sum().backward()

    step()  # warm: parameters' gradients exist before the measured call
    peak = _peak_extra_bytes(step)
    if mode == "auto":
        assert peak < logits / 4, f"peak {peak} B with the fused op; logits would be {logits} B"
    else:
        assert peak >= logits, f"the stored path should hold the {logits} B logits, peak {peak} B"


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
