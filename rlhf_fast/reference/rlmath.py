"""Reference PPO reward / advantage math: plain PyTorch, float64-capable, obviously correct.

The oracle for ``rlhf_fast.ops.{kl_penalty, shape_rewards, gae, masked_mean, masked_var,
masked_whiten}``: the same signatures plus ``compute_dtype``. GAE is the textbook
``for t in reversed(range(T))`` loop, made mask-aware the way verl does it (the next value and the
running advantage carry across masked tokens), so it is slow on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rlhf_fast import _rlmath_checks as C


def _dtype(compute_dtype, *tensors) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(frozen=True)
class KLFormula:
    """One KL estimator of ``d = logprobs - ref_logprobs`` (Schulman 2020, "Approximating KL
    Divergence"): value(d), and dvalue(d) = d value / d d (None: 1, the identity)."""

    value: Callable[[torch.Tensor], torch.Tensor]
    dvalue: Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]]


#: the formulas, keyed by ``_rlmath_checks.KL_ESTIMATORS`` (the one list of names)
KL_FORMULAS = {
    "k1": KLFormula(value=lambda d: d, dvalue=None),
    "k2": KLFormula(value=lambda d: 0.5 * d * d, dvalue=lambda d: d),
    "k3": KLFormula(value=lambda d: torch.exp(-d) + d - 1, dvalue=lambda d: 1.0 - torch.exp(-d)),
}
assert tuple(KL_FORMULAS) == C.KL_ESTIMATORS, "every KL estimator needs its formula"


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    *,
    estimator: str = "k1",
    clamp: float | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-token KL penalty with d = logprobs - ref_logprobs: k1 = d, k2 = d^2 / 2,
    k3 = exp(-d) + d - 1 (Schulman 2020). ``clamp`` clamps the result to [-clamp, clamp]."""
    estimator, clamp = C.check_kl_inputs(logprobs, ref_logprobs, estimator, clamp)
    dt = _dtype(compute_dtype, logprobs, ref_logprobs)
    d = logprobs.to(dt) - ref_logprobs.to(dt)
    k = KL_FORMULAS[estimator].value(d)
    if clamp is not None:
        k = k.clamp(-clamp, clamp)
    return k


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
    clamp: float | None = None,
    compute_dtype: torch.dtype | None = None,
):
    """``(rewards, kl)``, both (..., T): ``kl`` is the per-token penalty on valid tokens (0 elsewhere),
    ``rewards = -kl_coef * kl`` plus ``scores[...]`` at the last valid token of each row."""
    mask, kl_coef, estimator, clamp = C.check_shape_rewards_inputs(
        scores, logprobs, ref_logprobs, mask, kl_coef, estimator, clamp
    )
    dt = _dtype(compute_dtype, logprobs, ref_logprobs, scores)
    k = kl_penalty(logprobs, ref_logprobs, estimator=estimator, clamp=clamp, compute_dtype=dt)
    zero = torch.zeros((), dtype=dt, device=k.device)
    kl = torch.where(mask, k, zero)
    rewards = torch.where(mask, -kl_coef * kl, zero)
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device)
    last = torch.where(mask, pos, -1).amax(-1) if T > 0 else torch.full(mask.shape[:-1], -1, device=mask.device)
    at_last = (pos == last.unsqueeze(-1)) & (last.unsqueeze(-1) >= 0)
    rewards = rewards + torch.where(at_last, scores.to(dt).unsqueeze(-1), zero)
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
    compute_dtype: torch.dtype | None = None,
):
    """``(advantages, returns)``, both (..., T). Over valid tokens only, from the end:
    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next`` where V_next
    and A_next belong to the next *valid* token (0 after the last one). Masked tokens are skipped
    (the carries pass through them) and get 0; ``returns = advantages + values`` on valid tokens."""
    mask, gamma, lam = C.check_gae_inputs(rewards, values, mask, gamma, lam)
    dt = _dtype(compute_dtype, rewards, values)
    zero = torch.zeros((), dtype=dt, device=rewards.device)
    r = torch.where(mask, rewards.to(dt), zero)  # padding may be NaN: select, never multiply
    v = torch.where(mask, values.to(dt), zero)
    lead = r.shape[:-1]
    next_value = torch.zeros(lead, dtype=dt, device=r.device)
    running = torch.zeros(lead, dtype=dt, device=r.device)
    adv = torch.zeros_like(r)
    for t in reversed(range(r.shape[-1])):
        m = mask[..., t]
        delta = r[..., t] + gamma * next_value - v[..., t]
        running = torch.where(m, delta + gamma * lam * running, running)
        next_value = torch.where(m, v[..., t], next_value)
        adv[..., t] = torch.where(m, running, zero)
    returns = torch.where(mask, adv + v, zero)
    return adv, returns


def _moments(x: torch.Tensor, mask: torch.Tensor, group, dt: torch.dtype):
    """(count, mean, M2) over valid entries of all ranks: two passes, two all_reduces."""
    zero = torch.zeros((), dtype=dt, device=x.device)
    xv = torch.where(mask, x.to(dt), zero)
    n_sum = torch.stack([mask.sum().to(dt), xv.sum()])
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(n_sum, group=group)
    n, s = n_sum[0], n_sum[1]
    mean = torch.where(n > 0, s / n.clamp(min=1), zero)
    m2 = torch.where(mask, (x.to(dt) - mean) ** 2, zero).sum()
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(m2, group=group)
    return n, mean, m2


def _var(n, m2, unbiased: bool):
    # Too few entries (none, or one with unbiased=True): variance 0, never NaN.
    return m2 / (n - (1 if unbiased else 0)).clamp(min=1)


def masked_mean(x, mask, *, group=None, compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean of the valid entries (over all ranks of ``group``); 0 when there are none."""
    mask, _ = C.check_whiten_inputs(x, mask)
    return _moments(x, mask, group, _dtype(compute_dtype, x))[1]


def masked_var(x, mask, *, unbiased: bool = True, group=None, compute_dtype: torch.dtype | None = None):
    """Variance of the valid entries (divide by n - 1 when ``unbiased``, as ``torch.var``; by n
    otherwise, as TF). 0 when there are too few entries."""
    mask, _ = C.check_whiten_inputs(x, mask)
    n, _, m2 = _moments(x, mask, group, _dtype(compute_dtype, x))
    return _var(n, m2, unbiased)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    group=None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps)`` on valid entries (mean added back unless ``shift_mean``),
    0 on masked entries; statistics over the valid entries of all ranks of ``group``."""
    mask, eps = C.check_whiten_inputs(x, mask, eps)
    dt = _dtype(compute_dtype, x)
    n, mean, m2 = _moments(x, mask, group, dt)
    var = _var(n, m2, unbiased)
    y = (x.to(dt) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return torch.where(mask, y, torch.zeros((), dtype=dt, device=x.device))
