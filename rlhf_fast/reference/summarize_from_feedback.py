"""vwxyzjn/summarize_from_feedback_details' PPO update (the N+ TL;DR code), re-derived in float64
from its equations: the oracle the ``tldr`` preset is held to (tests/test_preset_parity_sources.py).

Written from ``summarize_from_feedback_details/ppo.py`` at ee77a9abc31f5338365ee087945c5bcafac7f1ca
(``__main__``'s rollout and training loop, ``truncate_response``, ``first_true_indices``,
``masked_mean`` / ``masked_whiten``, ``ScalarModel``, ``PolicyAndValueWrapper``), in the layout
of ``sbatches/ppo.sbatch`` for pythia-1b-deduped: ``accelerate launch --config_file
deepspeed.yaml`` (8 processes, ZeRO-2), ``--local_micro_batch_size=16
--gradient_accumulation_steps=4``, ``nminibatches`` 1, so each optimizer step averages 32
micro-batch losses of 16 rows each (``accelerator.backward`` divides by the accumulation steps,
DeepSpeed averages the 8 ranks). Here those micro-batches are the groups of ``group_rows``
consecutive rows of each minibatch, in the order the caller's permutation puts them: the same
mean of per-group token means on one process. Nothing here uses ``rlhf_fast.algos``,
``rlhf_fast.ops`` or ``rlhf_fast.reference.rlmath``: every formula is spelled out, in float64.

Model conventions (not update equations): the forwards run the Hugging Face modules with
left-padded queries and ``position_ids = cumsum(mask) - mask`` ("N details" #3, this project's
convention); upstream passes no position ids, so its left-padded rows see positions counted from
the padding. The policy's old log-probs are a forward at the temperature, where upstream takes
them from the sampler's processed scores (the same distribution).

One update (``ppo_update``), per upstream:

    postprocessed = tokens after the first EOS -> PAD;  seq_len = last non-PAD index (R - 1 without EOS)
    logprobs, ref_logprobs at T + 1e-7; values = critic(query + response)[:, Q - 1 : -1]
    score = RM(postprocessed);  score = -1 without an EOS            (non_eos_penalty)
    padding_mask = idx > seq_len;  padding_mask_p1 = idx > seq_len + 1
    logprobs, ref_logprobs <- 1.0 on padding_mask;  values <- 0 on padding_mask_p1
    rewards = -kl_coef * (logprobs - ref_logprobs);  rewards[actual_end] += score,
        actual_end = seq_len + 1 if seq_len + 1 < R else seq_len
    GAE over all R (next value 0 after the last); returns = A + V
    A <- masked_whiten(A, ~padding_mask) (biased variance, +1e-8), 0 on padding_mask
    lr = lr * (1 - (update - 1) / num_updates), set once per update
    for epoch: permutation;  for minibatch:  for each group of G rows (a rank's micro-batch):
        vf_loss = 0.5 * masked_mean(max((v - R)^2, (clip(v, old +- cv) - R)^2), ~padding_mask_p1)
        pg_loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 +- c)), ~padding_mask)
        grad += (pg_loss + vf_coef * vf_loss) / n_groups
        AdamW(policy + critic parameters, lr, eps) step: torch's default weight_decay 0.01
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
INVALID_LOGPROB = 1.0


def first_true_indices(bools: Tensor) -> Tensor:
    """(B,) index of the first True of each row; the row length when there is none."""
    R = bools.shape[-1]
    idx = torch.where(bools, torch.arange(R, device=bools.device), R)
    return idx.min(-1).values


def truncate_response(responses: Tensor, eos: int, pad: int) -> Tensor:
    """Tokens after the first ``eos`` become ``pad`` (the EOS itself stays)."""
    trunc = first_true_indices(responses == eos).unsqueeze(-1)
    idx = torch.arange(responses.shape[1], device=responses.device)
    return torch.where(idx > trunc, torch.full_like(responses, pad), responses)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum()


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``masked_whiten``: masked mean, biased masked variance, ``rsqrt(var + 1e-8)``."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


def _hidden_and_logits(model, queries: Tensor, query_mask: Tensor, responses: Tensor):
    Q = queries.shape[1]
    ids = torch.cat([queries, responses], 1)
    mask = torch.cat([query_mask.bool(), torch.ones_like(responses, dtype=torch.bool)], 1)
    pos = (mask.long().cumsum(1) - mask.long()).clamp(min=0)
    return Q, torch.where(mask, ids, 0), mask.long(), pos


def policy_logprobs(policy, queries: Tensor, query_mask: Tensor, responses: Tensor, temperature: float) -> Tensor:
    """(B, R) float64 log-probs of ``responses`` (every sampled token attended: upstream runs the
    untruncated ``query_responses``) under ``logits / (temperature + 1e-7)``. ``policy``: an
    ``rlhf_fast.models.Policy``, used only for its Hugging Face module."""
    Q, ids, mask, pos = _hidden_and_logits(policy, queries, query_mask, responses)
    logits = policy.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    logits = logits[:, Q - 1 : -1].double() / (temperature + 1e-7)
    return torch.gather(F.log_softmax(logits, -1), 2, responses.unsqueeze(-1)).squeeze(-1)


def critic_values(critic, queries: Tensor, query_mask: Tensor, responses: Tensor) -> Tensor:
    """(B, R) float64 ``ScalarModel`` outputs at the states that predict each response token
    (``full_value[:, context_length - 1 : -1]``). ``critic``: an ``rlhf_fast.models.Critic``, used
    for its Hugging Face backbone and its head's ``Linear`` (weight and bias)."""
    Q, ids, mask, pos = _hidden_and_logits(critic, queries, query_mask, responses)
    hidden = critic.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    lin = critic.value_head.linear
    return lin(hidden[:, Q - 1 : -1].to(lin.weight.dtype)).squeeze(-1).double()


@dataclass(frozen=True)
class Experience:
    """The rollout after ``torch.no_grad()``: everything (B, R) float64 except ``seq_len`` (B,)."""

    logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    padding_mask: Tensor
    padding_mask_p1: Tensor
    rewards: Tensor
    scores: Tensor


def experience(policy, ref_policy, critic, queries, query_mask, responses, scores, *, eos: int, pad: int,
               kl_coef: float, temperature: float, gamma: float, lam: float, whiten_rewards: bool,
               penalty_reward_value: float = -1.0) -> Experience:
    """Steps 1-6 of ``ppo.py``'s update (scores: the reward model's on the truncated responses,
    before the missing-EOS penalty)."""
    with torch.no_grad():
        logprobs = policy_logprobs(policy, queries, query_mask, responses, temperature)
        ref_logprobs = policy_logprobs(ref_policy, queries, query_mask, responses, temperature)
        values = critic_values(critic, queries, query_mask, responses)
    return shape_experience(logprobs, ref_logprobs, values, responses, scores, eos=eos, pad=pad, kl_coef=kl_coef,
                            gamma=gamma, lam=lam, whiten_rewards=whiten_rewards,
                            penalty_reward_value=penalty_reward_value)


def shape_experience(logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, responses: Tensor, scores: Tensor, *,
                     eos: int, pad: int, kl_coef: float, gamma: float, lam: float, whiten_rewards: bool,
                     penalty_reward_value: float = -1.0) -> Experience:
    """Steps 3-6 of the update on given (B, R) log-probs, reference log-probs and values of the
    sampled ``responses`` (B, R): the masks, the rewards with the score at ``actual_end``, GAE and
    the advantage whitening, in float64."""
    post = truncate_response(responses, eos, pad)
    logprobs, ref_logprobs, values = logprobs.double(), ref_logprobs.double(), values.double()
    R = responses.shape[1]
    seq_len = first_true_indices(post == pad) - 1
    scores = torch.where((post == eos).any(-1), scores.double(), torch.full_like(scores.double(), penalty_reward_value))
    idx = torch.arange(R).repeat(responses.shape[0], 1)
    padding_mask = idx > seq_len[:, None]
    padding_mask_p1 = idx > (seq_len + 1)[:, None]
    logprobs = logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
    ref_logprobs = ref_logprobs.masked_fill(padding_mask, INVALID_LOGPROB)
    values = values.masked_fill(padding_mask_p1, 0.0)
    rewards = -kl_coef * (logprobs - ref_logprobs)
    end = torch.where(seq_len + 1 < R, seq_len + 1, seq_len)
    rewards[torch.arange(rewards.shape[0]), end] += scores
    if whiten_rewards:
        rewards = masked_whiten(rewards, ~padding_mask_p1, shift_mean=False).masked_fill(padding_mask_p1, 0.0)
    last, rev = torch.zeros(rewards.shape[0], dtype=torch.float64), []
    for t in reversed(range(R)):
        nextv = values[:, t + 1] if t < R - 1 else torch.zeros_like(last)
        last = rewards[:, t] + gamma * nextv - values[:, t] + gamma * lam * last
        rev.append(last)
    adv = torch.stack(rev[::-1], 1)
    returns = adv + values
    adv = masked_whiten(adv, ~padding_mask).masked_fill(padding_mask, 0.0)
    return Experience(logprobs, values, adv, returns, padding_mask, padding_mask_p1, rewards, scores)


def ppo_update(policy, ref_policy, critic, optimizer: torch.optim.Optimizer, queries, query_mask, responses, scores, *,
               eos: int, pad: int, update: int, num_updates: int, lr: float, perms: Sequence[Tensor],
               nminibatches: int, group_rows: int, kl_coef: float = 0.05, temperature: float = 0.7,
               gamma: float = 1.0, lam: float = 0.95, cliprange: float = 0.2, cliprange_value: float = 0.2,
               vf_coef: float = 0.1, whiten_rewards: bool = False) -> Experience:
    """One update after sampling, leaving ``policy`` and ``critic`` updated. ``optimizer``: the
    source's ``optim.AdamW(model.parameters(), lr=lr, eps=eps)`` over both models' parameters
    (the caller builds it once per run). ``update``: 1-based (upstream's loop variable).
    ``perms``: one (B,) order per epoch (upstream: ``np.random.permutation`` per rank)."""
    exp = experience(policy, ref_policy, critic, queries, query_mask, responses, scores, eos=eos, pad=pad,
                     kl_coef=kl_coef, temperature=temperature, gamma=gamma, lam=lam, whiten_rewards=whiten_rewards)
    for group in optimizer.param_groups:  # upstream sets param_groups[0]; there is one group
        group["lr"] = (1.0 - (update - 1.0) / num_updates) * lr
    B = responses.shape[0]
    mb = B // nminibatches
    for order in perms:
        for start in range(0, B, mb):
            rows = order[start : start + mb]
            optimizer.zero_grad()
            n_groups = mb // group_rows
            for g in range(n_groups):
                idx = rows[g * group_rows : (g + 1) * group_rows]
                loss = _group_loss(policy, critic, exp, queries[idx], query_mask[idx], responses[idx], idx,
                                   temperature=temperature, cliprange=cliprange, cliprange_value=cliprange_value,
                                   vf_coef=vf_coef)
                (loss / n_groups).backward()
            optimizer.step()
    return exp


def _group_loss(policy, critic, exp: Experience, q, qm, resp, idx, *, temperature, cliprange, cliprange_value,
                vf_coef) -> Tensor:
    """One rank's micro-batch loss (``pg_loss + vf_coef * vf_loss``)."""
    pm, pm1 = exp.padding_mask[idx], exp.padding_mask_p1[idx]
    new_lp = policy_logprobs(policy, q, qm, resp, temperature).masked_fill(pm, INVALID_LOGPROB)
    vpred = critic_values(critic, q, qm, resp).masked_fill(pm1, 0.0)
    old_v, ret, adv = exp.values[idx], exp.returns[idx], exp.advantages[idx]
    vclipped = torch.clamp(vpred, old_v - cliprange_value, old_v + cliprange_value)
    vf_loss = 0.5 * masked_mean(torch.maximum((vpred - ret) ** 2, (vclipped - ret) ** 2), ~pm1)
    ratio = torch.exp(new_lp - exp.logprobs[idx])
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange))
    return masked_mean(pg, ~pm) + vf_coef * vf_loss
