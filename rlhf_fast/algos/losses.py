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

@dataclass(frozen=True)
class Aggregation:
    """A registered loss aggregation: ``reduce(x, mask, normalizer)`` and the ``normalizer`` of a
    whole minibatch (its unit count: tokens or rows), which micro-batch losses divide by so that
    their sum is the minibatch loss (gradient accumulation)."""

    name: str
    reduce: Callable[..., Tensor]
    normalizer: Callable[[Tensor], Tensor]
    per_row: bool = False
    """``reduce`` also takes a (b,) normaliser, one per row (``group_normalizer``: the loss of
    ``PPOHyperParams.loss_group_rows``, a mean over groups of rows); False: a scalar only."""

    def __call__(self, x: Tensor, mask: Tensor, normalizer=None) -> Tensor:
        return self.reduce(x, mask, normalizer)


AGGREGATIONS: Registry[Aggregation] = Registry("loss aggregation")


def _register_aggregation(name: str, normalizer: Callable[[Tensor], Tensor], *, per_row: bool = False):
    def add(fn):
        AGGREGATIONS.register(name)(Aggregation(name, fn, normalizer, per_row))
        return fn

    return add


def _select(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _token_count(mask: Tensor) -> Tensor:
    """(): valid tokens of a minibatch mask (at least 1), float32."""
    return mask.bool().sum().clamp(min=1).float()


def _row_count(mask: Tensor) -> Tensor:
    """(): rows of a minibatch mask, float32."""
    return torch.tensor(float(mask.shape[0]), device=mask.device)


def _per_row(normalizer) -> bool:
    return isinstance(normalizer, Tensor) and normalizer.dim() == 1


@_register_aggregation("token-mean", normalizer=_token_count, per_row=True)
def token_mean(x: Tensor, mask: Tensor, normalizer: Optional[float | Tensor] = None) -> Tensor:
    """Sum over valid tokens / (number of valid tokens, or ``normalizer``). TRL, the N-details
    code and DeepSpeed-Chat average over all tokens of the minibatch. 0 when there are none.
    A (b,) ``normalizer`` divides each row's sum by its own entry (``group_normalizer``)."""
    if _per_row(normalizer):  # (b,) one normaliser per row: sum_rows(row sum / n_row)
        rows = _select(x, mask).sum(-1)  # (b,)
        return (rows / normalizer.to(rows.dtype).clamp(min=1)).sum()
    total = _select(x, mask).sum()
    n = mask.bool().sum() if normalizer is None else normalizer
    return total / torch.as_tensor(n, dtype=total.dtype, device=total.device).clamp(min=1)


@_register_aggregation("seq-mean", normalizer=_row_count, per_row=True)
def seq_mean(x: Tensor, mask: Tensor, normalizer: Optional[float | Tensor] = None) -> Tensor:
    """Mean over tokens within each row, then sum over rows / (number of rows, or
    ``normalizer``). Every response weighs the same whatever its length (OpenRLHF / verl
    "seq-mean-token-mean"). A row without valid tokens contributes 0 and still counts."""
    m = mask.bool()
    per_row = _select(x, m).sum(-1) / m.sum(-1).clamp(min=1).to(x.dtype)
    if _per_row(normalizer):
        return (per_row / normalizer.to(per_row.dtype).clamp(min=1)).sum()
    n = per_row.numel() if normalizer is None else normalizer
    return per_row.sum() / torch.as_tensor(n, dtype=per_row.dtype, device=per_row.device).clamp(min=1)


def group_normalizer(aggregation: Aggregation, mask: Tensor, group_rows: int) -> Tensor:
    """(b,) per-row normalisers of a minibatch whose loss is the mean over groups of ``group_rows``
    consecutive rows of each group's own aggregate (the sources' per-rank micro-batch losses
    averaged over ranks and accumulation steps: MOSS-RLHF, summarize_from_feedback_details): row i
    of group g gets ``n_groups * aggregation.normalizer(mask of g)``, so summing the rows' shares
    gives ``mean_g aggregate(group g)`` whichever rank or micro-batch holds a row."""
    if not aggregation.per_row:
        raise ValueError(f"loss aggregation {aggregation.name!r} takes no per-row normaliser, so it cannot be "
                         "averaged over groups of rows (algo.loss_group_rows)")
    b = mask.shape[0]
    if group_rows < 1 or b % group_rows:
        raise ValueError(f"algo.loss_group_rows {group_rows} must divide the minibatch's {b} rows")
    n_groups = b // group_rows
    per_group = torch.stack([aggregation.normalizer(g) for g in mask.split(group_rows)])  # (n_groups,)
    return (per_group * n_groups).repeat_interleave(group_rows)  # (b,)


def aggregate(x: Tensor, mask: Tensor, mode: str = "token-mean", *, normalizer=None) -> Tensor:
    """Reduce per-token ``x`` to a scalar with the registered aggregation ``mode``."""
    return AGGREGATIONS[mode](x, mask, normalizer)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return token_mean(x, mask).detach()


def _masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Max over ``mask``; 0 when nothing is valid (a select, not a host sync)."""
    m = mask.bool()
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if m.numel() == 0:
        return zero
    top = torch.where(m, x, torch.full((), -torch.inf, dtype=x.dtype, device=x.device)).max().detach()
    return torch.where(m.any(), top, zero)


# ---- policy loss ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyLossParams:
    """What a policy loss needs (no more: docs/architecture.md, "Conventions")."""

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


def approxkl_per_token(logr: Tensor) -> Tensor:
    """The approximate KL of each token, ``0.5 * logr^2`` with ``logr = logp - old_logp``
    (lm-human-preference-details: ``approxkl = 0.5 * mean(logr^2)``). The one formula of the
    ``approxkl`` statistic: ``PolicyLossOutput.approxkl``, the trainer's minibatch statistics
    (``trainers/ppo_core.py``: over the tokens still inside the sampling filter, summed over ranks)
    and the reference iteration (``trainers/parity/ppo_reference.py``) each average it over their tokens."""
    return 0.5 * logr**2


@dataclass
class PolicyLossOutput:
    """loss: differentiable scalar. The per-token statistics, detached, (..., T) like ``mask``:

    logr: logp - old_logp (0 on padding). clipped: bool, the clipped term is the larger (active)
    one. dual_clipped: bool, the dual clip capped the loss. The token means over ``mask``
    (approxkl = 0.5 * mean(logr^2) as lm-human-preference-details, clipfrac, ratio_mean,
    ratio_max, dual_clipfrac) are properties; the trainer sums the per-token fields over the
    whole minibatch instead (one all-reduce, no host sync per micro-batch).
    """

    loss: Tensor
    logr: Tensor
    clipped: Tensor
    dual_clipped: Tensor
    mask: Tensor

    @property
    def approxkl(self) -> Tensor:
        return _masked_mean(approxkl_per_token(self.logr), self.mask)

    @property
    def clipfrac(self) -> Tensor:
        return _masked_mean(self.clipped.to(self.logr.dtype), self.mask)

    @property
    def ratio_mean(self) -> Tensor:
        return _masked_mean(torch.exp(self.logr), self.mask)

    @property
    def ratio_max(self) -> Tensor:
        return _masked_max(torch.exp(self.logr), self.mask)

    @property
    def dual_clipfrac(self) -> Tensor:
        return _masked_mean(self.dual_clipped.to(self.logr.dtype), self.mask)


POLICY_LOSSES: Registry[Callable[..., PolicyLossOutput]] = Registry("policy loss")


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
    return PolicyLossOutput(
        loss=aggregate(per_token, m, params.aggregation, normalizer=normalizer), logr=logr.detach(),
        clipped=(pg2 > pg1).detach() & m, dual_clipped=dual & m, mask=m,
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
    never = torch.zeros_like(m)
    return PolicyLossOutput(
        loss=aggregate(-_select(advantages.detach(), m) * ratio, m, params.aggregation, normalizer=normalizer),
        logr=logr.detach(), clipped=never, dual_clipped=never, mask=m,
    )


def policy_loss(name: str, logprobs, old_logprobs, advantages, mask, params: PolicyLossParams, *, normalizer=None):
    """Dispatch to the registered policy loss ``name``."""
    return POLICY_LOSSES[name](logprobs, old_logprobs, advantages, mask, params, normalizer=normalizer)


# ---- value loss -------------------------------------------------------------------------------


@dataclass
class ValueLossOutput:
    """loss: differentiable scalar (includes the 0.5, not the value coefficient). The per-token
    statistics, detached, (..., T) like ``mask``: values (the new values, 0 on padding),
    sq_error ((v - returns)^2), clipped (bool: the clamp is active and the clipped error is the
    larger). Their token means are properties: clipfrac (val/clipfrac), vpred (val/vpred),
    error (val/error)."""

    loss: Tensor
    values: Tensor
    sq_error: Tensor
    clipped: Tensor
    mask: Tensor

    @property
    def clipfrac(self) -> Tensor:
        return _masked_mean(self.clipped.to(self.values.dtype), self.mask)

    @property
    def vpred(self) -> Tensor:
        return _masked_mean(self.values, self.mask)

    @property
    def error(self) -> Tensor:
        return _masked_mean(self.sq_error, self.mask)


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
        clipped = torch.zeros_like(m)
    else:
        old = _select(old_values.detach(), m)
        v_clip = old + torch.clamp(values - old, -clip_range, clip_range)
        err2 = (v_clip - ret) ** 2
        per_token = torch.maximum(err1, err2)
        # Count a token as clipped only where the clamp is active: inside the range old + (v - old)
        # can round away from v, and err2 > err1 by an ulp is not clipping.
        active = (values - old).abs() > clip_range
        clipped = (active & (err2 > err1)).detach() & m
    return ValueLossOutput(
        loss=0.5 * aggregate(per_token, m, aggregation, normalizer=normalizer), values=values.detach(),
        sq_error=err1.detach(), clipped=clipped, mask=m,
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
