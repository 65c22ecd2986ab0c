"""Float64 oracle of the asynchronous rollouts' off-policy correction (``rlhf_fast.algos.off_policy``):
the importance weights and the decoupled PPO objective written out token by token, the way the
papers state them (Hilton et al. 2022, "Batch size-invariance for policy optimization", eq. 2; AReaL,
Fu et al. 2025, section 5.2, eq. 5; truncation: IMPALA, Espeholt et al. 2018, eq. 1). Slow on purpose:
Python loops over tokens, ``math`` on floats."""

from __future__ import annotations

import math
from typing import Optional

import torch


def behaviour_weights(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor, *,
                      cap: Optional[float] = None, compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(..., T) ``min(pi_prox / pi_behav, cap)`` per valid token, 0 on padding (same signature as
    ``algos.off_policy.behaviour_weights`` plus ``compute_dtype``: float64 is the oracle, float32 the
    way a peer computes it)."""
    prox, behav = proximal_logprobs.to(compute_dtype), behaviour_logprobs.to(compute_dtype)
    out = torch.zeros(prox.shape, dtype=compute_dtype)
    m = mask.bool()
    for idx in torch.nonzero(m).tolist():
        i = tuple(idx)
        w = torch.exp(prox[i] - behav[i])  # in compute_dtype
        if cap is not None and float(w) > cap:
            w = torch.tensor(cap, dtype=compute_dtype)
        out[i] = w
    return out


def decoupled_ppo_loss(logprobs: torch.Tensor, proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                       advantages: torch.Tensor, mask: torch.Tensor, *, clip_low: float = 0.2,
                       clip_high: Optional[float] = None, dual_clip: Optional[float] = None,
                       cap: Optional[float] = None, compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The decoupled clipped objective's token-mean loss, a scalar in ``compute_dtype``,
    differentiable in ``logprobs``:

        w = min(exp(prox - behav), cap)   (a constant);   r = exp(logp - prox)
        l = w * max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)),  and with dual_clip c where A < 0:
        l = w * min(max(...), -A c)

    averaged over the valid tokens (0 without any)."""
    high = clip_low if clip_high is None else clip_high
    lp = logprobs.to(compute_dtype)
    prox, behav, adv = (t.detach().to(compute_dtype) for t in (proximal_logprobs, behaviour_logprobs, advantages))
    terms = []
    for idx in torch.nonzero(mask.bool()).tolist():
        i = tuple(idx)
        w = math.exp(float(prox[i]) - float(behav[i]))
        if cap is not None:
            w = min(w, cap)
        a = float(adv[i])
        r = torch.exp(lp[i] - prox[i])
        loss = torch.maximum(-a * r, -a * r.clamp(1.0 - clip_low, 1.0 + high))
        if dual_clip is not None and a < 0:
            loss = torch.minimum(loss, torch.tensor(-a * dual_clip, dtype=compute_dtype))
        terms.append(w * loss)
    if not terms:
        return lp.sum() * 0.0
    return torch.stack(terms).sum() / len(terms)
