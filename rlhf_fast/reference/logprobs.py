"""Reference token log-probs and entropy: plain PyTorch, float64-capable, obviously correct.

This is the oracle the fused op is tested and benchmarked against. It materialises the full
[..., V] log-softmax, which is exactly what the fast path avoids.
"""

from __future__ import annotations

import torch

from rlhf_fast import _checks, _filter


def gather_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    compute_dtype: torch.dtype | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """``log_softmax(logits / temperature)[labels]`` (and the entropy), the slow plain way; with a
    sampling filter, the log-softmax over the kept tokens only (the others set to -inf).

    Args:
        logits: (..., V) floating.
        labels: (...) integer; entries equal to ``ignore_index`` give 0 and no gradient.
        compute_dtype: the dtype the math runs in. Default: float64 for float64 logits, else
            float32 (the upcast every peer does). Pass ``logits.dtype`` for a half-precision
            baseline.
        top_k, top_p: the engine's filter (0 / 1.0 = off). The kept set is the engine's, decided on
            the float32 scaled logits ``logits.float() / temperature`` by
            ``rlhf_fast._filter.filter_logits`` (a discrete choice the engine makes in float32; the
            log-softmax over it then runs in ``compute_dtype``). A label outside it: -inf, no gradient.
    Returns:
        logprobs (...) in ``compute_dtype`` (float32 by default), and entropy (...) if asked.
    """
    temperature = _checks.check_logprob_inputs(logits, labels, temperature, ignore_index)
    top_k, top_p = _filter.check_filter(top_k, top_p)
    if compute_dtype is None:
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(compute_dtype) / temperature
    ignored = labels == ignore_index
    safe = torch.where(ignored, torch.zeros_like(labels), labels).long()
    label_kept = torch.ones_like(ignored)
    if _filter.filter_active(top_k, top_p, logits.shape[-1]):
        with torch.no_grad():
            kept = _filter.filter_logits(_filter.scaled_logits(logits.detach(), temperature), top_k, top_p) > float("-inf")
            kept |= ~kept.any(-1, keepdim=True)  # all -inf: nothing to filter
        z = z.masked_fill(~kept, float("-inf"))
        label_kept = kept.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.log_softmax(z, dim=-1)
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    lp = torch.where(label_kept, lp, torch.full_like(lp, float("-inf")))
    lp = torch.where(ignored, torch.zeros_like(lp), lp)
    if not return_entropy:
        return lp
    p = logp.exp()
    # p * log p with log p set to 0 where p == 0: no 0 * -inf NaN, forward or backward.
    safe_logp = torch.where(p > 0, logp, torch.zeros_like(logp))
    entropy = -(p * safe_logp).sum(-1)
    return lp, entropy
