"""Slow reference for the engine's token choice (``rlhf_fast.engine.sampling.sample_next``).

Written row by row, from the definitions, in ``compute_dtype`` (float64 for the oracle):

- stop ids get -inf before ``min_new_tokens`` (the caller says whether they are blocked);
- logits / temperature;
- top-k: keep every token whose logit is >= the k-th largest (ties with the k-th kept);
- top-p: in descending order, drop a token when the probability mass ranked strictly above it
  already reaches ``top_p``; the most likely token is always kept;
- the sampled distribution is the softmax over what is kept; a draw ``u`` in (0, 1) picks the
  first token whose cumulative probability exceeds ``u`` times the total (inverse CDF).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def filtered_logprobs(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    blocked: Sequence[int] = (),
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """(B, V) log-probs of the distribution each row is sampled from; -inf outside its support."""
    out = torch.full(logits.shape, -math.inf, dtype=compute_dtype)
    for b in range(logits.shape[0]):
        z = logits[b].to(compute_dtype).clone()
        for tok in blocked:
            z[tok] = -math.inf
        z = z / temperature
        V = z.numel()
        keep = [bool(torch.isfinite(z[i])) for i in range(V)]
        if 0 < top_k < V:
            kth = sorted(z.tolist(), reverse=True)[top_k - 1]
            keep = [k and z[i].item() >= kth for i, k in enumerate(keep)]
        if top_p < 1.0:
            zk = torch.where(torch.tensor(keep), z, torch.tensor(-math.inf, dtype=compute_dtype))
            probs = torch.softmax(zk, 0)
            order = sorted(range(V), key=lambda i: -zk[i].item())
            above = torch.zeros((), dtype=compute_dtype)
            for rank, i in enumerate(order):
                if rank > 0 and above >= top_p:
                    keep[i] = False
                above = above + probs[i]
        zk = torch.where(torch.tensor(keep), z, torch.tensor(-math.inf, dtype=compute_dtype))
        out[b] = torch.log_softmax(zk, 0)
    return out


def inverse_cdf(logprobs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token chosen by the draw ``u`` (B,) from (B, V) ``logprobs``: the first index whose
    cumulative probability exceeds ``u * total``. Returns (tokens, the (B, V) CDF)."""
    cdf = logprobs.exp().cumsum(-1)
    target = u.to(cdf.dtype) * cdf[:, -1]
    tokens = torch.tensor([int((cdf[b] > target[b]).nonzero()[0]) for b in range(cdf.shape[0])])
    return tokens, cdf
