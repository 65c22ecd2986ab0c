"""Advantage estimators (registry): "gae" (critic-based, PPO), "grpo" (group-normalised sequence
rewards, no critic) and "rloo" (leave-one-out baseline, no critic). Each takes an
``AdvantageInput`` and ``AdvantageParams`` and returns ``(advantages, returns)``, both (B, T),
0 on padding. ``backend`` picks ``rlhf_fast.ops`` (default) or ``rlhf_fast.reference``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from rlhf_fast.algos.backend import resolve
from rlhf_fast.algos.registry import Registry

Tensor = torch.Tensor


@dataclass(frozen=True)
class AdvantageInput:
    """rewards: (B, T) per-token rewards (``shape_rewards``: score at the last valid token, minus
    beta * KL when the KL is in the reward). mask: (B, T) bool response mask.
    values: (B, T) old values (gae only). group_ids: (B,) long, equal for rows that answer the
    same prompt (grpo / rloo only). value_mask: (B, T) bool, the tokens the score and values live
    on when they extend past ``mask`` (``algo.score_position`` "after_stop"): gae runs and
    whitens rewards over it, and whitens advantages over ``mask``; None = ``mask``."""

    rewards: Tensor
    mask: Tensor
    values: Optional[Tensor] = None
    group_ids: Optional[Tensor] = None
    value_mask: Optional[Tensor] = None


@dataclass(frozen=True)
class AdvantageParams:
    """The hyper-parameters estimators read (each uses only its own)."""

    gamma: float = 1.0
    """gae discount ("N details" #15: 1)."""
    lam: float = 0.95
    """gae lambda ("N details" #15: 0.95; verl and OpenRLHF default 1)."""
    whiten_rewards: bool = False
    """gae: whiten the token rewards without shifting their mean before GAE ("N details" #18)."""
    whiten_advantages: bool = True
    """gae: whiten advantages (with the mean shift) after GAE; rloo: whiten the sequence
    advantages ("N details" #18; TRL; PPO-max advantage normalisation)."""
    unbiased: bool = False
    """variance denominator n - 1 (torch.var, TRL) or n (TF, lm-human-preferences; "N details" #18)."""
    eps: float = 1e-8
    """added to the variance before rsqrt in whitening (TRL, the N-details code)."""
    group_scale_by_std: bool = True
    """grpo: divide by the group's std (GRPO); False drops it (Dr. GRPO)."""
    group_eps: float = 1e-6
    """grpo: added to the group std (verl ``epsilon = 1e-6``)."""


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator and what its caller must provide (docs/architecture.md, "Variation
    points"): ``needs_values`` — the trainer builds a critic or value head and trains it with the
    value loss; ``needs_groups`` — rows carry ``group_ids`` (``samples_per_prompt`` > 1 makes
    groups). ``fn(inp, params, backend=) -> (advantages, returns)``."""

    name: str
    fn: Callable[..., tuple[Tensor, Tensor]]
    needs_values: bool
    needs_groups: bool = False

    def __call__(self, inp: "AdvantageInput", params: "AdvantageParams", *, backend=None) -> tuple[Tensor, Tensor]:
        return self.fn(inp, params, backend=backend)


ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def register_estimator(name: str, *, needs_values: bool, needs_groups: bool = False):
    """``@register_estimator("name", needs_values=...)`` on ``fn(inp, params, *, backend=None)``."""

    def add(fn):
        ESTIMATORS.register(name)(AdvantageEstimator(name, fn, needs_values=needs_values, needs_groups=needs_groups))
        return fn

    return add


@register_estimator("gae", needs_values=True)
def gae_advantages(inp: AdvantageInput, params: AdvantageParams, *, backend=None) -> tuple[Tensor, Tensor]:
    """Rewards (optionally whitened without mean shift) -> ``gae`` -> advantages (optionally
    whitened). Returns are taken before advantage whitening (``returns = A + V``), the value
    target of the N-details code and TRL."""
    if inp.values is None:
        raise ValueError("gae needs AdvantageInput.values (a critic or a value head)")
    ops = resolve(backend)
    rewards = inp.rewards
    vmask = inp.mask if inp.value_mask is None else inp.value_mask  # summarize_from_feedback_details: padding_mask_p1
    if params.whiten_rewards:
        rewards = ops.masked_whiten(rewards, vmask, shift_mean=False, unbiased=params.unbiased, eps=params.eps)
    adv, ret = ops.gae(rewards, inp.values, vmask, gamma=params.gamma, lam=params.lam)
    if params.whiten_advantages:
        adv = ops.masked_whiten(adv, inp.mask, shift_mean=True, unbiased=params.unbiased, eps=params.eps)
    elif inp.value_mask is not None:
        adv = torch.where(inp.mask.bool(), adv, torch.zeros((), dtype=adv.dtype, device=adv.device))
    return adv, ret


def sequence_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """(B,) sum of the valid token rewards of each row: score - beta * sum(KL) with KL in the
    reward (TRL RLOO's ``rlhf_reward``), the plain score with KL in the loss."""
    m = mask.bool()
    return torch.where(m, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device)).sum(-1)


def _group_sums(x: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row (sum over the row's group of x, size of the row's group)."""
    if group_ids is None:
        raise ValueError("grpo / rloo need AdvantageInput.group_ids (rows of one prompt share an id)")
    if tuple(group_ids.shape) != tuple(x.shape):
        raise ValueError(f"group_ids must have shape {tuple(x.shape)}, got {tuple(group_ids.shape)}")
    _, inv = torch.unique(group_ids, return_inverse=True)
    sums = torch.zeros(int(inv.max()) + 1 if inv.numel() else 0, dtype=x.dtype, device=x.device).index_add_(0, inv, x)
    counts = torch.bincount(inv, minlength=sums.numel()).to(x.dtype)
    return sums[inv], counts[inv]


def _broadcast(seq_adv: Tensor, mask: Tensor) -> Tensor:
    m = mask.bool()
    return torch.where(m, seq_adv.unsqueeze(-1).expand(m.shape), torch.zeros((), dtype=seq_adv.dtype, device=m.device))


@register_estimator("grpo", needs_values=False, needs_groups=True)
def grpo_advantages(inp: AdvantageInput, params: AdvantageParams, *, backend=None) -> tuple[Tensor, Tensor]:
    """GRPO (Shao et al. 2024, outcome supervision): ``A_i = (r_i - mean_g) / (std_g + eps)``
    over the rows of group g (std unbiased, as ``torch.std``; 0 for a single-row group), the same
    for every token of row i. There is no critic, so returns = advantages (verl)."""
    r = sequence_rewards(inp.rewards, inp.mask).to(torch.promote_types(inp.rewards.dtype, torch.float32))
    sums, n = _group_sums(r, inp.group_ids)
    mean = sums / n
    sq, _ = _group_sums((r - mean) ** 2, inp.group_ids)
    adv = r - mean
    if params.group_scale_by_std:
        std = (sq / (n - 1).clamp(min=1)).sqrt()
        adv = adv / (std + params.group_eps)
    adv = _broadcast(adv, inp.mask)
    return adv, adv


@register_estimator("rloo", needs_values=False, needs_groups=True)
def rloo_advantages(inp: AdvantageInput, params: AdvantageParams, *, backend=None) -> tuple[Tensor, Tensor]:
    """RLOO (Ahmadian et al. 2024; TRL RLOOTrainer): ``A_i = r_i - mean_{j != i, j in g} r_j``,
    0 for a single-row group; whitened over the batch when ``whiten_advantages`` (TRL's
    ``normalize_advantage``). Broadcast to every valid token; returns = advantages."""
    r = sequence_rewards(inp.rewards, inp.mask).to(torch.promote_types(inp.rewards.dtype, torch.float32))
    sums, n = _group_sums(r, inp.group_ids)
    baseline = (sums - r) / (n - 1).clamp(min=1)
    adv = torch.where(n > 1, r - baseline, torch.zeros_like(r))
    if params.whiten_advantages:
        ops = resolve(backend)
        adv = ops.masked_whiten(adv, torch.ones_like(adv, dtype=torch.bool), unbiased=params.unbiased, eps=params.eps)
        adv = adv.to(r.dtype)
    adv = _broadcast(adv, inp.mask)
    return adv, adv


def compute_advantages(name: str, inp: AdvantageInput, params: AdvantageParams, *, backend=None):
    """Dispatch to the registered estimator ``name``."""
    return ESTIMATORS[name](inp, params, backend=backend)


def contiguous_group_ids(batch_size: int, group_size: int, device=None) -> Tensor:
    """group ids for a prompt-major layout (rows ``i*k .. i*k+k-1`` answer prompt i)."""
    if group_size < 1 or batch_size % group_size:
        raise ValueError(f"batch_size {batch_size} must be a multiple of group_size {group_size} >= 1")
    return torch.arange(batch_size, device=device) // group_size
