"""The critic-free family beyond ``grpo`` / ``rloo`` (``algos/advantages.py``), each a registry
entry (docs/architecture.md, "Variation points") with its source:

- estimators ``dr_grpo`` (GRPO without the per-group std), ``reinforce_pp`` (REINFORCE++) and
  ``reinforce_pp_baseline`` (REINFORCE++ with the group-mean baseline);
- the loss aggregation ``seq-mean-token-sum-norm`` (Dr. GRPO's constant-length normaliser);
- the policy loss ``gspo`` (GSPO: a sequence-level importance ratio);
- DAPO's rollout-side pieces: ``overlong_penalty`` (soft overlong punishment) and
  ``informative_groups`` (dynamic sampling keeps the groups whose scores differ).

DAPO's loss itself is ``ppo_clip`` with decoupled ``clip_range`` / ``clip_range_high`` and the
``token-mean`` aggregation (both already in ``algos/losses.py``); KL in the loss with k1 / k2 / k3
is the ``in_loss`` placement (``algos/kl.py``). The presets in ``algos/hparams.py`` combine them.
"""

from __future__ import annotations

from typing import Optional

import torch

from rlhf_fast.algos.advantages import (
    AdvantageInput, AdvantageParams, _broadcast, _group_sums, register_estimator, sequence_rewards,
)
from rlhf_fast.algos.backend import resolve
from rlhf_fast.algos.losses import (
    POLICY_LOSSES, PolicyLossOutput, PolicyLossParams, _register_aggregation, _select, aggregate,
)

Tensor = torch.Tensor


# ---- advantage estimators ---------------------------------------------------------------------


@register_estimator("dr_grpo", needs_values=False, needs_groups=True)
def dr_grpo_advantages(inp: AdvantageInput, params: AdvantageParams, *, backend=None) -> tuple[Tensor, Tensor]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", eq. 3; TRL
    ``scale_rewards="none"``, verl ``norm_adv_by_std_in_grpo=False``): ``A_i = r_i - mean_g``,
    the group mean without the division by the group's std (which up-weights groups that are
    almost all right or all wrong). Same for every token of row i; returns = advantages."""
    r = sequence_rewards(inp.rewards, inp.mask).to(torch.promote_types(inp.rewards.dtype, torch.float32))
    sums, n = _group_sums(r, inp.group_ids)
    adv = _broadcast(r - sums / n, inp.mask)
    return adv, adv


def _discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """(B, T) ``G_t = sum_{s >= t} gamma^(s - t) r_s`` over the valid tokens (OpenRLHF
    ``get_cumulative_returns``), 0 on padding. A reverse loop over T: T is the response length.
    Masked tokens are skipped, not counted as steps: the running return carries across a hole
    undiscounted, as in ``gae`` (docs/architecture.md, "Ops"); for right-padded masks (OpenRLHF's
    only kind) the two readings agree. Counting holes as steps (decaying the return across them)
    was a bug that hypothesis 6.100 found at gamma 0.5 (tests/test_critic_free.py)."""
    m = mask.bool()
    r = torch.where(m, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    out = torch.zeros_like(r)
    running = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        running = torch.where(m[..., t], r[..., t] + gamma * running, running)
        out[..., t] = running
    return torch.where(m, out, torch.zeros((), dtype=r.dtype, device=r.device))


def _whiten_tokens(x: Tensor, mask: Tensor, params: AdvantageParams, backend) -> Tensor:
    """Global-batch advantage normalisation over every valid token (mean shift and scale), as
    OpenRLHF does for its REINFORCE-family estimators."""
    out = resolve(backend).masked_whiten(x, mask, shift_mean=True, unbiased=params.unbiased, eps=params.eps)
    return torch.where(mask.bool(), out.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device))


@register_estimator("reinforce_pp", needs_values=False)
def reinforce_pp_advantages(inp: AdvantageInput, params: AdvantageParams, *, backend=None) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025, arXiv 2501.03262; OpenRLHF ``advantage_estimator=reinforce``,
    ``openrlhf/trainer/ppo_utils/experience_maker.py``): the token rewards (score at the last
    token minus beta * KL per token: the KL sits in the reward) -> discounted returns
    ``G_t = sum_{s>=t} gamma^(s-t) r_s`` -> advantages whitened over all valid tokens of the
    global batch when ``whiten_advantages``. No critic, no groups; returns = the unwhitened G."""
    ret = _discounted_returns(inp.rewards, inp.mask, params.gamma)
    adv = _whiten_tokens(ret, inp.mask, params, backend) if params.whiten_advantages else ret
    return adv, ret


@register_estimator("reinforce_pp_baseline", needs_values=False, needs_groups=True)
def reinforce_pp_baseline_advantages(inp: AdvantageInput, params: AdvantageParams, *,
                                     backend=None) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline (OpenRLHF ``advantage_estimator=reinforce_baseline``): the mean
    sequence reward of the row's group is subtracted at the last valid token, then the
    discounted returns and the global token whitening of ``reinforce_pp``. OpenRLHF subtracts the
    group mean of the bare scores and pairs it with KL in the loss (``--use_kl_loss
    --kl_estimator k2``, the ``reinforce_pp_baseline`` preset): then the sequence reward is the
    score and the two agree; with KL in the reward the group mean here includes the KL."""
    seq = sequence_rewards(inp.rewards, inp.mask)
    sums, n = _group_sums(seq, inp.group_ids)
    m = inp.mask.bool()
    pos = torch.arange(m.shape[-1], device=m.device)
    last_idx = torch.where(m, pos, -1).max(-1, keepdim=True).values  # (B, 1) the last valid token (-1: none)
    last = m & (pos == last_idx)  # (B, T): one token per row, whatever holes the mask has
    rewards = inp.rewards - torch.where(last, (sums / n).unsqueeze(-1).to(inp.rewards.dtype), 0.0)
    ret = _discounted_returns(rewards, m, params.gamma)
    adv = _whiten_tokens(ret, m, params, backend) if params.whiten_advantages else ret
    return adv, ret


# ---- loss aggregation -------------------------------------------------------------------------


def _rows_times_length(mask: Tensor) -> Tensor:
    """(): rows x the padded response length R of a minibatch mask (R = max_new_tokens: a constant)."""
    return torch.tensor(float(mask.shape[0] * max(mask.shape[-1], 1)), device=mask.device)


@_register_aggregation("seq-mean-token-sum-norm", normalizer=_rows_times_length)
def seq_mean_token_sum_norm(x: Tensor, mask: Tensor, normalizer: Optional[float | Tensor] = None) -> Tensor:
    """Dr. GRPO's length-unbiased aggregation (Liu et al. 2025, eq. 3; TRL ``loss_type="dr_grpo"``:
    ``(loss * mask).sum() / (B * max_completion_length)``; verl ``seq-mean-token-sum-norm``):
    the sum over all valid tokens divided by rows x R, a constant, so that a long response's tokens
    weigh as much as a short one's (GRPO's per-sequence 1/|o_i| favours long wrong answers)."""
    total = _select(x, mask).sum()
    n = _rows_times_length(mask) if normalizer is None else normalizer
    return total / torch.as_tensor(n, dtype=total.dtype, device=total.device).clamp(min=1)


# ---- policy loss ------------------------------------------------------------------------------


@POLICY_LOSSES.register("gspo")
def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    params: PolicyLossParams = PolicyLossParams(),
    *,
    normalizer=None,
) -> PolicyLossOutput:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7; verl
    ``compute_policy_loss_gspo``; TRL ``importance_sampling_level="sequence"``): one importance
    ratio per response, the geometric mean of its token ratios,

        s_i   = exp(mean_{t valid} (logp_t - old_logp_t))
        s_i,t = sg[s_i] * exp(logp_t - sg[logp_t])      (the GSPO-token form: value s_i,
                                                         gradient s_i * grad logp_t)
        loss  = max(-A * s_i,t, -A * clip(s_i,t, 1 - clip_low, 1 + clip_high))

    aggregated as ``params.aggregation`` (verl and the paper: a mean per sequence, "seq-mean").
    The per-token ``logr`` reported is the sequence's ``log s_i`` (so ratio / clip statistics are
    those of the sequence ratios); ``dual_clipped`` is never set (``dual_clip`` is refused)."""
    if params.dual_clip is not None:
        raise ValueError("gspo has no dual clip: set algo.dual_clip to null")
    m = mask.bool()
    high = params.clip_low if params.clip_high is None else params.clip_high
    adv = _select(advantages.detach(), m)
    logr_tok = _select(logprobs - _select(old_logprobs.detach(), m), m)  # (..., T)
    seq_logr = logr_tok.sum(-1) / m.sum(-1).clamp(min=1).to(logr_tok.dtype)  # (...,) log s_i
    logr = _select(seq_logr.detach().unsqueeze(-1) + logprobs - logprobs.detach(), m)  # value log s_i, grad logp
    ratio = torch.exp(logr)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - params.clip_low, 1.0 + high)
    per_token = torch.maximum(pg1, pg2)
    return PolicyLossOutput(
        loss=aggregate(per_token, m, params.aggregation, normalizer=normalizer), logr=logr.detach(),
        clipped=(pg2 > pg1).detach() & m, dual_clipped=torch.zeros_like(m), mask=m,
    )


# ---- DAPO's rollout-side pieces -----------------------------------------------------------------


def overlong_penalty(lengths: Tensor, *, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; verl ``overlong_buffer``):

        0                                       if L <= max_length - buffer
        factor * ((max_length - buffer) - L) / buffer   if max_length - buffer < L <= max_length
        -factor                                  if L > max_length

    added to the score of a response of L tokens. (B,) float32."""
    if buffer < 1 or buffer > max_length:
        raise ValueError(f"overlong buffer must lie in [1, max_length={max_length}], got {buffer}")
    L = lengths.to(torch.float32)
    start = float(max_length - buffer)
    pen = torch.clamp((start - L) / float(buffer), max=0.0)
    return factor * torch.where(L > max_length, torch.full_like(pen, -1.0), pen)


def informative_groups(scores: Tensor, group_ids: Tensor) -> Tensor:
    """(B,) bool: rows whose group's scores are not all equal (DAPO dynamic sampling, Yu et al.
    2025 eq. 11, "0 < |{correct}| < G"; verl ``filter_groups`` on the final sequence reward). A
    group of identical scores has zero advantage under every group baseline, so it carries no
    gradient: dropping it keeps the batch's effective size."""
    if group_ids is None:
        raise ValueError("dynamic sampling needs groups: set ppo.samples_per_prompt > 1")
    _, inv = torch.unique(group_ids, return_inverse=True)
    k = int(inv.max()) + 1 if inv.numel() else 0
    lo = torch.full((k,), torch.inf, dtype=scores.dtype, device=scores.device).scatter_reduce(0, inv, scores, "amin")
    hi = torch.full((k,), -torch.inf, dtype=scores.dtype, device=scores.device).scatter_reduce(0, inv, scores, "amax")
    return (hi > lo)[inv]
