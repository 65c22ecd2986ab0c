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


def kept_cut(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
             e_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The cut of ``rlhf_fast/_filter.py`` ("The kept set") from its definition, row by row, with a
    full stable sort: ((N,) float32 cut value, (N,) int64 cut index) of (N, V) ``logits``. The masses
    e = exp(z - max z) are taken in ``e_dtype`` (float64: the exact rule; the kernels' float32 exps
    differ in the last bits) and summed in float64, in the sorted order. A row with a NaN or a
    non-finite max keeps everything (value -inf, index V - 1), as does a filter that is off."""
    N, V = logits.shape
    z32 = logits.float() / temperature
    value = torch.full((N,), -math.inf, dtype=torch.float32)
    index = torch.full((N,), V - 1, dtype=torch.int64)
    k_on, p_on = 0 < top_k < V, top_p < 1.0
    for r in range(N):
        z = z32[r]
        m = z.max()
        if torch.isnan(z).any() or not torch.isfinite(m) or not (k_on or p_on):
            continue
        vals, order = torch.sort(z, descending=True, stable=True)  # (z desc, id asc)
        kth = vals[top_k - 1] if k_on else torch.tensor(-math.inf)
        if not p_on:
            value[r] = kth
            continue
        n = int((vals >= kth).sum())  # the top-k set: a prefix of the order
        v = vals[:n]
        e = (torch.exp(v.double() - m.double()) if e_dtype == torch.float64 else torch.exp(v - m)).double()
        S = e.sum()
        above = torch.cat([e.new_zeros(1), torch.cumsum(e, 0)[:-1]])  # mass ranked strictly above
        keep = above < top_p * S
        keep[0] = True
        last = int(keep.nonzero().max())  # a prefix: ``above`` never decreases
        value[r], index[r] = v[last], order[last]
    return value, index
