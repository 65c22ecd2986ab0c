"""Reference token log-probs and entropy: plain PyTorch, float64-capable, obviously correct.

This is the oracle the fused op is tested and benchmarked against. It materialises the full
[..., V] log-softmax, which is exactly what the fast path avoids.
"""

from __future__ import annotations

import torch

from rlhf_fast import _checks


def gather_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    compute_dtype: torch.dtype | None = None,
):
    """``log_softmax(logits / temperature)[labels]`` (and the entropy), the slow plain way.

    Args:
        logits: (..., V) floating.
        labels: (...) integer; entries equal to ``ignore_index`` give 0 and no gradient.
        compute_dtype: the dtype the math runs in. Default: float64 for float64 logits, else
            float32 (the upcast every peer does). Pass ``logits.dtype`` for a half-precision
            baseline.
    Returns:
        logprobs (...) in ``compute_dtype`` (float32 by default), and entropy (...) if asked.
    """
    temperature = _checks.check_logprob_inputs(logits, labels, temperature, ignore_index)
    if compute_dtype is None:
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(compute_dtype) / temperature
    logp = torch.log_softmax(z, dim=-1)
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels).long()
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    lp = torch.where(ignored, torch.zeros_like(lp), lp)
    if not return_entropy:
        return lp
    p = logp.exp()
    # p * log p with log p set to 0 where p == 0: no 0 * -inf NaN, forward or backward.
    safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    entropy = -(p * safe_logp).sum(-1)
    return lp, entropy
