"""Scalar heads, padding-aware position ids, last-valid-token gather and log-probs from hidden states.

These are the small pure pieces the Policy, Critic and RewardModel wrappers share.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rlhf_fast import _checks


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - mask``, clamped at 0: position 0 at the first valid token of each row
    whatever the left padding ("The N Implementation Details of RLHF with PPO" #3: with it,
    left-padded logits equal unpadded ones). Pads get position 0. int64, same shape as the mask."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - mask).clamp_(min=0)


def last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with ``mask == 1`` in each row (works for left, right and no
    padding, and for masks with holes). A row with no valid token gives 0. Shape ``mask.shape[:-1]``."""
    mask = attention_mask.bool()
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, positions, 0).amax(-1)


def gather_last_valid(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``values[b, last_valid_index(mask)[b]]`` for per-token ``values`` of shape (B, T)."""
    if values.shape != attention_mask.shape:
        raise ValueError(
            f"values must have the shape of attention_mask {tuple(attention_mask.shape)}, got {tuple(values.shape)}"
        )
    idx = last_valid_index(attention_mask).unsqueeze(-1)
    return values.gather(-1, idx).squeeze(-1)


class ScalarHead(nn.Module):
    """``Linear(hidden_size, 1)`` over the final hidden state, kept in float32 whatever the
    backbone's dtype (the head is tiny; its output feeds the RL math, which is float32)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> (...) float32."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def init_reward_head(head: ScalarHead, seed: int | None = None) -> ScalarHead:
    """Weight ~ N(0, std = 1 / sqrt(d_model + 1)), bias 0 ("The N Implementation Details of RLHF
    with PPO" #8; the paper's appendix omits the sqrt, a typo that OpenRLHF copies; N+ uses the
    same init). Drawn from a private generator when ``seed`` is given."""
    std = 1.0 / math.sqrt(head.hidden_size + 1)
    gen = None
    if seed is not None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(head.linear.weight.shape, generator=gen, dtype=torch.float32) * std
        head.linear.weight.copy_(w)
        head.linear.bias.zero_()
    return head


def init_value_head(head: ScalarHead) -> ScalarHead:
    """Weight and bias zero ("The N Implementation Details of RLHF with PPO" #11): the initial
    value estimate is 0 everywhere."""
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.zero_()
    return head


# ---- the fused-or-stored choice (``ppo.use_linear_logprobs``) ----------------------------------

# The logits budget of "auto" (``ppo.logits_budget_mb``; benchmarks/bench_linear_logprob.py --real,
# docs/architecture.md "Log-probs from hidden states"): up to it (441 tokens at V = 151,936 in
# float32) the stored logits are smaller than the head's own (V, H) weight gradient, so storing them
# at most doubles the head's memory; beyond it they grow without bound while the fused op keeps one
# row chunk, at a time within ~10 % of the stored path's on the CPU from 1,024 tokens (float32).
DEFAULT_LOGITS_BUDGET_MB = 256.0


def check_linear_logprob_mode(mode, logits_budget_mb: float) -> None:
    """ValueError naming the argument unless ``mode`` is "auto", True or False and the budget is a
    finite number > 0 (MB)."""
    if not (mode == "auto" or isinstance(mode, bool)):
        raise ValueError(f"use_linear_logprobs must be 'auto', True or False, got {mode!r}")
    if isinstance(logits_budget_mb, bool) or not isinstance(logits_budget_mb, (int, float)) \
            or not math.isfinite(logits_budget_mb) or logits_budget_mb <= 0:
        raise ValueError(f"logits_budget_mb must be a finite number > 0, got {logits_budget_mb!r}")


def head_out_features(lm_head: nn.Module) -> int:
    """V of the head: ``out_features`` (kept when ZeRO-3 empties the weight's local shard), else the
    weight's first dimension."""
    v = getattr(lm_head, "out_features", None)
    return int(v) if v is not None else int(lm_head.weight.shape[0])


def logits_bytes(n_rows: int, vocab: int, dtype: torch.dtype) -> int:
    """Bytes of the (n_rows, vocab) logits the stored path forms, in the head's output ``dtype``."""
    return int(n_rows) * int(vocab) * torch.empty((), dtype=dtype).element_size()


def use_fused_head(mode, hidden: torch.Tensor, lm_head: nn.Module, logits_budget_mb: float) -> bool:
    """Whether the call on ``hidden`` (..., H) takes ``ops.linear_logprobs``: only ``mode`` True
    ("auto" never does: ``chunk_rows`` splits its calls instead)."""
    return mode is True


def chunk_rows(mode, hidden: torch.Tensor, lm_head: nn.Module, logits_budget_mb: float) -> int | None:
    """Rows per chunk of the stored path under "auto" when the call's logits, rows x V x element
    size, would exceed ``logits_budget_mb`` MB (2**20 bytes): as many rows as fit the budget (at
    least one); None (one piece, the plain stored path) otherwise, or when ``mode`` is not "auto".
    A function of the rows' count only, so one micro-batch's policy log-probs are taken the same way
    in the scoring pass, the reference and the update."""
    if mode != "auto":
        return None
    rows = hidden.numel() // max(hidden.shape[-1], 1)
    dtype = torch.promote_types(hidden.dtype, lm_head.weight.dtype)
    per_row = logits_bytes(1, head_out_features(lm_head), dtype)
    budget = logits_budget_mb * 2**20
    if rows * per_row <= budget:
        return None
    return max(1, int(budget // per_row))


def _stored_logprobs(hidden, lm_head, labels, **kw):
    from rlhf_fast.ops import gather_logprobs

    # A sliced (non-contiguous) hidden makes torch fall back from one GEMM to a batched matmul
    # for frozen weights (2.25x slower on CPU, measured in bench_ppo): the copy is (..., H), small.
    return gather_logprobs(lm_head(hidden.contiguous()), labels, **kw)


def _chunked_stored_logprobs(hidden, lm_head, labels, rows: int, **kw):
    """The stored path on ``rows`` rows at a time; with gradients, each chunk under activation
    checkpointing (``torch.utils.checkpoint``, non-reentrant), so its logits exist only inside its
    own forward and again inside its backward: memory rows x V instead of tokens x V, for one more
    head forward per chunk in the backward. Each chunk's numbers are the stored path's on those rows
    (the same GEMM on a slice of them, the same gather_logprobs)."""
    from torch.utils.checkpoint import checkpoint

    lead = labels.shape
    h, y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    parts = []
    for r0 in range(0, y.numel(), rows):
        hc, yc = h[r0 : r0 + rows], y[r0 : r0 + rows]
        out = (checkpoint(_stored_logprobs, hc, lm_head, yc, use_reentrant=False, **kw) if grad
               else _stored_logprobs(hc, lm_head, yc, **kw))
        parts.append(out if isinstance(out, tuple) else (out,))
    joined = [torch.cat(p).reshape(lead) for p in zip(*parts)]
    return tuple(joined) if kw.get("return_entropy") else joined[0]


def _linear_logprobs_op():
    """``rlhf_fast.ops.linear_logprobs`` if this build has it, else None (imported lazily)."""
    try:
        from rlhf_fast import ops
    except ImportError:  # pragma: no cover - the ops package always exists
        return None
    return getattr(ops, "linear_logprobs", None)


def logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    use_linear_logprobs: bool | str = False,
    top_k: int = 0,
    top_p: float = 1.0,
    logits_budget_mb: float = DEFAULT_LOGITS_BUDGET_MB,
):
    """Per-token log-probs of ``labels`` under ``softmax(lm_head(hidden) / temperature)``, or under
    the engine's top-k / top-p filtered and renormalised distribution (``ops.gather_logprobs``).

    hidden (..., H), labels (...) -> float32 (...) [, entropy (...)]. With
    ``use_linear_logprobs`` and an ``ops.linear_logprobs`` present (and a bias-free ``nn.Linear``
    head), the logits are never stored whole; otherwise the logits are formed and
    ``ops.gather_logprobs`` fuses the log-softmax and gather. ``use_linear_logprobs="auto"``: the
    fused op when the logits would exceed ``logits_budget_mb`` (``use_fused_head``). Labels equal
    to ``ignore_index`` give 0. Temperature divides the logits ("The N Implementation Details of
    RLHF with PPO" #10).
    """
    from rlhf_fast.ops import gather_logprobs

    _checks.check_tensor("hidden", hidden, floating=True, min_dim=1)
    check_linear_logprob_mode(use_linear_logprobs, logits_budget_mb)
    kw = dict(temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index, top_k=top_k,
              top_p=top_p)
    op = _linear_logprobs_op() if use_fused_head(use_linear_logprobs, hidden, lm_head, logits_budget_mb) else None
    if op is not None and isinstance(lm_head, nn.Linear) and lm_head.bias is None:
        return op(hidden, lm_head.weight, labels, **kw)
    rows = chunk_rows(use_linear_logprobs, hidden, lm_head, logits_budget_mb)
    if rows is not None:
        return _chunked_stored_logprobs(hidden, lm_head, labels, rows, **kw)
    return _stored_logprobs(hidden, lm_head, labels, **kw)


class FusedHeadLogprobs(nn.Module):
    """``logprobs_from_hidden`` through the LM head of ``model``, run as a module forward.

    Under DeepSpeed ZeRO-3 a parameter is gathered only around the forward (and backward) of a
    module that owns it or has it registered as an external parameter. ``ops.linear_logprobs``
    reads ``lm_head.weight`` without calling ``lm_head``, so the weight would be an empty shard;
    run through this module, with the weight registered as its external parameter
    (``register_zero3_weight``), ZeRO-3 gathers it for the fused op's forward and backward.
    ``model`` is held without registering it as a submodule (no second copy in ``state_dict``),
    and the head is looked up at each call (``resize_token_embeddings`` may replace it).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_model", model)

    def head(self) -> nn.Module:
        return self._model.get_output_embeddings()

    def register_zero3_weight(self) -> None:
        """Registers the head's weight as this module's external parameter when ZeRO-3 partitions
        it (idempotent; a no-op otherwise)."""
        weight = self.head().weight
        if hasattr(weight, "ds_id") and hasattr(self, "ds_external_parameters"):
            if all(p is not weight for _, p in self.ds_external_parameters()):
                import deepspeed

                deepspeed.zero.register_external_parameter(self, weight)

    def forward(self, hidden, labels, temperature: float = 1.0, return_entropy: bool = False, ignore_index: int = -100,
                top_k: int = 0, top_p: float = 1.0):
        return logprobs_from_hidden(hidden, self.head(), labels, temperature=temperature, return_entropy=return_entropy,
                                    ignore_index=ignore_index, use_linear_logprobs=True, top_k=top_k, top_p=top_p)


def shifted_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token labels ``input_ids[:, 1:]`` with padded targets set to ``ignore_index``.
    Shape (B, T - 1): entry t is the token at t + 1, predicted from the hidden state at t."""
    labels = input_ids[:, 1:]
    return labels.masked_fill(~attention_mask[:, 1:].bool(), ignore_index)
