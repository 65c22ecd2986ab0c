"""PPO losses as small pure functions: aggregation, the clipped policy surrogate (registry of
policy losses), the clipped value loss of baselines ppo2, the entropy bonus and KL-in-the-loss.

Conventions: every per-token tensor is (..., T) with a bool/0-1 ``mask`` of the same shape;
padding is removed with ``torch.where`` (never by multiplying, so NaN padding stays harmless).
Every loss takes an optional ``normalizer``: with gradient accumulation, pass the token count
(``token-mean``) or the row count (``seq-mean``) of the whole minibatch, so that summing the
micro-batch losses gives exactly the minibatch loss whatever the micro-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rlhf_fast.algos.registry import Registry

Tensor = torch.Tensor


# ---- aggregation ------------------------------------------------------------------------------

AGGREGATIONS: Registry[Callable[..., Tensor]] = Registry("loss aggregation")


def _select(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


@AGGREGATIONS.register("token-mean")
def token_mean(x: Tensor, mask: Tensor, normalizer: Optional[float | Tensor] = None) -> Tensor:
    """Sum over valid tokens / (number of valid tokens, or ``normalizer``). TRL, the N-details
    code and DeepSpeed-Chat average over all tokens of the minibatch. 0 when there are none."""
    total = _select(x, mask).sum()
    n = mask.bool().sum() if normalizer is None else normalizer
    return total / torch.as_tensor(n, dtype=total.dtype, device=total.device).clamp(min=1)


@AGGREGATIONS.register("seq-mean")
def seq_mean(x: Tensor, mask: Tensor, normalizer: Optional[float | Tensor] = None) -> Tensor:
    """Mean over tokens within each row, then sum over rows / (number of rows, or
    ``normalizer``). Every response weighs the same whatever its length (OpenRLHF / verl
    "seq-mean-token-mean"). A row without valid tokens contributes 0 and still counts."""
    m = mask.bool()
    per_row = _select(x, m).sum(-1) / m.sum(-1).clamp(min=1).to(x.dtype)
    n = per_row.numel() if normalizer is None else normalizer
    return per_row.sum() / torch.as_tensor(n, dtype=per_row.dtype, device=per_row.device).clamp(min=1)


def aggregate(x: Tensor, mask: Tensor, mode: str = "token-mean", *, normalizer=None) -> Tensor:
    """Reduce per-token ``x`` to a scalar with the registered aggregation ``mode``."""
    return AGGREGATIONS[mode](x, mask, normalizer)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return token_mean(x, mask).detach()


def _masked_max(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.bool()
    if not bool(m.any()):  # host sync: stats only
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(m, x, torch.full((), -torch.inf, dtype=x.dtype, device=x.device)).max().detach()


# ---- policy loss ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLossParams:
    """What a policy loss needs (no more: STYLE #7)."""

    clip_low: float = 0.2
    """ratio lower bound 1 - clip_low (PPO; "N details" #19: 0.2)."""
    clip_high: Optional[float] = None
    """ratio upper bound 1 + clip_high; None = clip_low (symmetric). yuanxuns' PPO uses 0.3."""
    dual_clip: Optional[float] = None
    """dual-clip constant c > 1 (Ye et al. 2020; verl ``clip_ratio_c`` = 3): for negative
    advantages the per-token loss is capped at -A * c. None = off."""
    aggregation: str = "token-mean"
    """"token-mean" or "seq-mean" (see ``AGGREGATIONS``)."""

    def __post_init__(self) -> None:
        if not self.clip_low >= 0 or (self.clip_high is not None and not self.clip_high >= 0):
            raise ValueError(f"clip_low / clip_high must be >= 0, got {self.clip_low} / {self.clip_high}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ValueError(f"dual_clip must be None or > 1, got {self.dual_clip}")
        AGGREGATIONS[self.aggregation]  # raises on a typo


@dataclass
class PolicyLossOutput:
    """loss: differentiable scalar. The rest: detached token-mean statistics over ``mask``.

    approxkl: 0.5 * mean((logp - old_logp)^2) (lm-human-preference-details). clipfrac: fraction
    of tokens where the clipped term is the larger (active) one. ratio_mean / ratio_max: of
    exp(logp - old_logp). dual_clipfrac: fraction of tokens capped by the dual clip.
    """

    loss: Tensor
    approxkl: Tensor
    clipfrac: Tensor
    ratio_mean: Tensor
    ratio_max: Tensor
    dual_clipfrac: Tensor


POLICY_LOSSES: Registry[Callable[..., PolicyLossOutput]] = Registry("policy loss")


def _ratio_stats(logr: Tensor, ratio: Tensor, mask: Tensor):
    return _masked_mean(0.5 * logr.detach() ** 2, mask), _masked_mean(ratio.detach(), mask), _masked_max(ratio.detach(), mask)


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    params: PolicyLossParams = PolicyLossParams(),
    *,
    normalizer=None,
) -> PolicyLossOutput:
    """The clipped surrogate (Schulman et al. 2017; baselines ppo2), per token:

        ratio = exp(logp - old_logp)
        loss  = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))

    with the optional dual clip ``loss = min(loss, -A * c)`` where A < 0. ``logprobs`` carries the
    gradient; ``old_logprobs`` and ``advantages`` are treated as constants."""
    m = mask.bool()
    high = params.clip_low if params.clip_high is None else params.clip_high
    # Padding is selected away before any arithmetic: a NaN there would otherwise reach the
    # gradient as 0 * NaN.
    adv = _select(advantages.detach(), m)
    logr = _select(logprobs - _select(old_logprobs.detach(), m), m)
    ratio = torch.exp(logr)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - params.clip_low, 1.0 + high)
    per_token = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(m)
    if params.dual_clip is not None:
        pg3 = -adv * params.dual_clip
        dual = (adv < 0) & (pg3 < per_token)
        per_token = torch.where(adv < 0, torch.minimum(per_token, pg3), per_token)
    approxkl, ratio_mean, ratio_max = _ratio_stats(logr, ratio, m)
    return PolicyLossOutput(
        loss=aggregate(per_token, m, params.aggregation, normalizer=normalizer),
        approxkl=approxkl,
        clipfrac=_masked_mean((pg2 > pg1).to(logprobs.dtype), m),
        ratio_mean=ratio_mean,
        ratio_max=ratio_max,
        dual_clipfrac=_masked_mean(dual.to(logprobs.dtype), m),
    )


@POLICY_LOSSES.register("vanilla_pg")
def vanilla_pg_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    params: PolicyLossParams = PolicyLossParams(),
    *,
    normalizer=None,
) -> PolicyLossOutput:
    """The unclipped importance-weighted policy gradient ``-A * ratio`` (REINFORCE with a
    baseline when there is one epoch: ratio = 1, gradient ``-A * grad logp``)."""
    m = mask.bool()
    logr = _select(logprobs - _select(old_logprobs.detach(), m), m)
    ratio = torch.exp(logr)
    approxkl, ratio_mean, ratio_max = _ratio_stats(logr, ratio, m)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    return PolicyLossOutput(
        loss=aggregate(-_select(advantages.detach(), m) * ratio, m, params.aggregation, normalizer=normalizer),
        approxkl=approxkl, clipfrac=zero, ratio_mean=ratio_mean, ratio_max=ratio_max, dual_clipfrac=zero,
    )


def policy_loss(name: str, logprobs, old_logprobs, advantages, mask, params: PolicyLossParams, *, normalizer=None):
    """Dispatch to the registered policy loss ``name``."""
    return POLICY_LOSSES[name](logprobs, old_logprobs, advantages, mask, params, normalizer=normalizer)


# ---- value loss -------------------------------------------------------------------------------


@dataclass
class ValueLossOutput:
    """loss: differentiable scalar (includes the 0.5, not the value coefficient).
    clipfrac: fraction of tokens where the clipped error is the larger (val/clipfrac).
    vpred: mean new value (val/vpred). error: mean (v - returns)^2 (val/error)."""

    loss: Tensor
    clipfrac: Tensor
    vpred: Tensor
    error: Tensor


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: Optional[float] = 0.2,
    aggregation: str = "token-mean",
    normalizer=None,
) -> ValueLossOutput:
    """Clipped value loss of baselines ppo2 ("N details" #19), per token:

        v_clip = old_v + clip(v - old_v, -clip_range, clip_range)
        loss   = 0.5 * max((v - R)^2, (v_clip - R)^2)

    ``clip_range=None`` gives the plain ``0.5 * (v - R)^2``. Only ``values`` carries gradient."""
    m = mask.bool()
    values = _select(values, m)  # padding selected away first (no 0 * NaN in the gradient)
    ret = _select(returns.detach(), m)
    err1 = (values - ret) ** 2
    if clip_range is None:
        per_token = err1
        clipfrac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        old = _select(old_values.detach(), m)
        v_clip = old + torch.clamp(values - old, -clip_range, clip_range)
        err2 = (v_clip - ret) ** 2
        per_token = torch.maximum(err1, err2)
        # Count a token as clipped only where the clamp is active: inside the range old + (v - old)
        # can round away from v, and err2 > err1 by an ulp is not clipping.
        active = (values - old).abs() > clip_range
        clipfrac = _masked_mean((active & (err2 > err1)).to(values.dtype), m)
    return ValueLossOutput(
        loss=0.5 * aggregate(per_token, m, aggregation, normalizer=normalizer),
        clipfrac=clipfrac,
        vpred=_masked_mean(values.detach(), m),
        error=_masked_mean(err1.detach(), m),
    )


# ---- entropy bonus and KL in the loss ---------------------------------------------------------


def entropy_bonus(entropy: Tensor, mask: Tensor, *, coef: float, aggregation: str = "token-mean", normalizer=None) -> Tensor:
    """The term added to the loss for an entropy bonus: ``-coef * aggregate(entropy)`` (the
    loss goes down as entropy goes up). PPO-max lists it as optional; 0 in the N-details runs."""
    return -coef * aggregate(entropy, mask, aggregation, normalizer=normalizer)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    coef: float,
    estimator: str = "k3",
    clamp: Optional[float] = None,
    aggregation: str = "token-mean",
    normalizer=None,
    backend=None,
) -> tuple[Tensor, Tensor]:
    """KL placed in the loss (GRPO style, verl ``use_kl_loss``): returns ``(coef * aggregate(kl),
    aggregate(kl))`` with ``kl = backend.kl_penalty(logprobs, ref_logprobs, estimator=...)``,
    differentiable w.r.t. ``logprobs``. ``backend``: ``rlhf_fast.ops`` (default) or
    ``rlhf_fast.reference``."""
    from rlhf_fast.algos.backend import resolve

    m = mask.bool()
    kl = resolve(backend).kl_penalty(_select(logprobs, m), _select(ref_logprobs.detach(), m), estimator=estimator, clamp=clamp)
    value = aggregate(kl, mask, aggregation, normalizer=normalizer)
    return coef * value, value.detach()
