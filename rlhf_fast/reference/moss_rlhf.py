"""OpenLMLab/MOSS-RLHF's PPO update (PPO-max), re-derived in float64 from its equations: the oracle
the ``ppo_max`` preset is held to (tests/test_preset_parity_sources.py).

Written from MOSS-RLHF at 4865d826fc6705dfdf1894aede00b4c81dabb24b: ``ppo/ppo_trainer.py``
(``make_experiences``, ``criterion``, ``train_step``, ``build_optimizer`` / ``get_parms``,
``invsqrt_scheduler``), ``ppo/ppo_datahelper.py`` (``ExperienceDataset.get_advantages_and_returns``,
``format``), ``utils.py`` (``RunningMoments``, ``get_global_statistics``, ``logprobs_from_logits``)
and ``train_ppo.py`` (``LlamaRewardModel``: ``reward_head = nn.Linear(hidden, 1, bias=False)``), in
the layout of ``train_ppo_en.sh``: ``accelerate launch --config_file accelerate_config.yaml``
(7 processes, DeepSpeed ZeRO-2, ``gradient_clipping`` 1.0, ``gradient_accumulation_steps`` 1),
``--batch_size 2 --rollout_batch_size 2 --num_rollouts 2``, ``--use_reward_scaling
--use_critic_loss_clip --use_policy_loss_clip``, ``--kl_penalty_weight 0.01``, ``--lr 5e-7
--critic_lr 1.5e-6``, ``--warmup_steps 100`` of ``--train_steps 1000``. Each rank trains on its
own 2 rollouts once per rollout (one optimizer step), and DeepSpeed averages the 7 ranks'
gradients: the step's loss is the mean over groups of 2 rows of each group's token mean. Here
those groups are ``group_rows`` consecutive rows in the caller's order. Nothing here uses
``rlhf_fast.algos``, ``rlhf_fast.ops`` or ``rlhf_fast.reference.rlmath``.

Model conventions (not update equations): left-padded queries with ``position_ids = cumsum(mask)
- mask``; upstream's Llama forwards pass no position ids (its left-padded rollout rows see
positions counted from the padding, its right-padded training rows do not); log-probs are taken
from the raw logits (temperature 1), as upstream.

One update (``ppo_update``), per upstream:

    response = sampled tokens through the first EOS (all of them without one)
    reward = RM(query + response) at the last token (the raw head: no normalisation)
    running.update(rewards) (mean / biased var over the batch; std with n - 1 of the running count)
    reward /= running.std                                    use_reward_scaling without use_reward_norm
    logprobs, ref_logprobs, values over the response tokens
    penalized = -kl_penalty_weight * (logprobs - ref_logprobs);  penalized[-1] += reward
    GAE per row over its response (next value 0 after the last), returns = A + V   (no advantage norm)
    per group of G rows:  n = its response tokens
        vf_loss = 0.5 * sum(max((v - R)^2, (clip(v, old +- 0.2) - R)^2) * mask) / n
        pg_loss = sum(max(-A * ratio, -A * clip(ratio, 1 +- 0.2)) * mask) / n
        grad += (pg_loss + vf_loss_weight * vf_loss) / n_groups
    clip the norm of all gradients (policy and critic together) at 1.0
    AdamW: policy lr * f(step), eps 1e-6; critic critic_lr * f(step), eps 1e-8; betas (0.9, 0.95), no decay
    f = invsqrt_scheduler(warmup): max(step / warmup, 0.1) while step < warmup, then sqrt(warmup / step)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def invsqrt_factor(step: int, warmup_steps: int) -> float:
    """``PPOTrainer.invsqrt_scheduler(warmup_steps)`` at 0-based ``step`` (LambdaLR's count)."""
    if step < warmup_steps:
        f = max(step / warmup_steps, 0.1)
    else:
        f = math.sqrt(warmup_steps) / math.sqrt(max(warmup_steps, step))
    return max(f, 1e-8)


@dataclass
class RunningMoments:
    """``utils.RunningMoments``: mean 0, var 1, count 1e-24 at the start."""

    mean: float = 0.0
    var: float = 1.0
    std: float = 1.0
    count: float = 1e-24

    def update(self, xs: Tensor) -> None:
        n = xs.numel()
        var, mean = torch.var_mean(xs.double(), unbiased=False)
        mean, var = float(mean), float(var)
        delta = mean - self.mean
        tot = self.count + n
        tot_sum = self.var * self.count + delta**2 * self.count * n / tot + var * n
        self.mean += delta * n / tot
        self.var = tot_sum / tot
        self.std = math.sqrt(self.var * tot / (tot - 1))
        self.count = tot


def _inputs(queries: Tensor, query_mask: Tensor, responses: Tensor, response_mask: Tensor):
    ids = torch.cat([queries, responses], 1)
    mask = torch.cat([query_mask.bool(), response_mask.bool()], 1)
    pos = (mask.long().cumsum(1) - mask.long()).clamp(min=0)
    return queries.shape[1], torch.where(mask, ids, 0), mask.long(), pos


def policy_logprobs(policy, queries, query_mask, responses, response_mask) -> Tensor:
    """(B, R) float64 ``logprobs_from_logits(logits[:, :-1], text_vec[:, 1:])`` at the response
    tokens (raw logits). ``policy``: an ``rlhf_fast.models.Policy`` (its Hugging Face module)."""
    Q, ids, mask, pos = _inputs(queries, query_mask, responses, response_mask)
    logits = policy.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    logp = F.log_softmax(logits[:, Q - 1 : -1].double(), -1)
    return torch.gather(logp, 2, responses.unsqueeze(-1)).squeeze(-1)


def critic_values(critic, queries, query_mask, responses, response_mask) -> Tensor:
    """(B, R) float64 ``critic(text_vec, only_last=False)[:, :-1]`` at the response tokens: the
    bias-free ``reward_head`` (the head's weight only) over the last hidden states."""
    Q, ids, mask, pos = _inputs(queries, query_mask, responses, response_mask)
    hidden = critic.backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    w = critic.value_head.linear.weight  # (1, H)
    return (hidden[:, Q - 1 : -1].to(w.dtype) @ w.t()).squeeze(-1).double()


def response_mask_through_eos(responses: Tensor, eos: int) -> Tensor:
    """(B, R) bool: the tokens ``Llama.generate`` returns, through the first EOS (``done``)."""
    hit = (responses == eos).long()
    return (hit.cumsum(1) - hit) == 0


@dataclass(frozen=True)
class Experience:
    """(B, R) float64 each (0 outside ``mask``), as ``ExperienceDataset.format`` lays them out."""

    mask: Tensor
    logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    rewards: Tensor


def experience(policy, ref_policy, critic, running: RunningMoments, queries, query_mask, responses, raw_rewards, *,
               eos: int, kl_penalty_weight: float, gamma: float, lam: float) -> Experience:
    """``make_experiences`` + ``get_advantages_and_returns``: ``raw_rewards`` (B,) are the reward
    model's scores of each query + response (its last token)."""
    mask = response_mask_through_eos(responses, eos)
    running.update(raw_rewards)
    rewards = raw_rewards.double() / running.std  # use_reward_scaling, not use_reward_norm
    with torch.no_grad():
        logprobs = policy_logprobs(policy, queries, query_mask, responses, mask)
        ref_logprobs = policy_logprobs(ref_policy, queries, query_mask, responses, mask)
        values = critic_values(critic, queries, query_mask, responses, mask)
    B = responses.shape[0]
    pen = torch.zeros(B, responses.shape[1], dtype=torch.float64)
    adv = torch.zeros_like(pen)
    for i in range(B):
        n = int(mask[i].sum())
        r = (-kl_penalty_weight * (logprobs[i, :n] - ref_logprobs[i, :n])).clone()
        r[-1] += rewards[i]
        pen[i, :n] = r
        last = 0.0
        for t in reversed(range(n)):
            nextv = values[i, t + 1] if t < n - 1 else 0.0
            last = r[t] + gamma * nextv - values[i, t] + gamma * lam * last
            adv[i, t] = last
    values = torch.where(mask, values, 0.0)
    return Experience(mask, torch.where(mask, logprobs, 0.0), values, adv, torch.where(mask, adv + values, 0.0), pen)


def ppo_update(policy, ref_policy, critic, optimizer: torch.optim.Optimizer, running: RunningMoments, queries,
               query_mask, responses, raw_rewards, *, eos: int, step: int, warmup_steps: int, lr: float,
               critic_lr: float, order: Tensor, group_rows: int, kl_penalty_weight: float = 0.01,
               gamma: float = 1.0, lam: float = 0.95, pg_clip: float = 0.2, value_clip: float = 0.2,
               vf_loss_weight: float = 1.0, max_grad_norm: float = 1.0) -> tuple[Experience, float]:
    """One rollout's training step, leaving ``policy`` and ``critic`` updated. ``optimizer``: the
    source's AdamW with param groups [policy (lr, eps 1e-6), critic (critic_lr, eps 1e-8)], betas
    (0.9, 0.95), weight decay 0 (built once per run by the caller); ``step``: 0-based optimizer
    step (the scheduler's count); ``order``: (B,) the rows' order, cut into groups of
    ``group_rows`` (each rank's ``batch_size`` rollouts). Returns the experience and the joint
    gradient norm before clipping."""
    exp = experience(policy, ref_policy, critic, running, queries, query_mask, responses, raw_rewards, eos=eos,
                     kl_penalty_weight=kl_penalty_weight, gamma=gamma, lam=lam)
    f = invsqrt_factor(step, warmup_steps)
    optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"] = lr * f, critic_lr * f
    optimizer.zero_grad()
    n_groups = len(order) // group_rows
    for g in range(n_groups):
        idx = order[g * group_rows : (g + 1) * group_rows]
        (_criterion(policy, critic, exp, queries[idx], query_mask[idx], responses[idx], idx, pg_clip=pg_clip,
                    value_clip=value_clip, vf_loss_weight=vf_loss_weight) / n_groups).backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # DeepSpeed gradient_clipping, one engine
    optimizer.step()
    return exp, float(norm)


def _criterion(policy, critic, exp: Experience, q, qm, resp, idx, *, pg_clip, value_clip, vf_loss_weight) -> Tensor:
    """``PPOTrainer.criterion`` on one rank's batch (use_critic_loss_clip, use_policy_loss_clip)."""
    mask = exp.mask[idx]
    n = mask.sum()
    lp = policy_logprobs(policy, q, qm, resp, mask) * mask
    values = critic_values(critic, q, qm, resp, mask)
    old_v, ret, adv = exp.values[idx], exp.returns[idx], exp.advantages[idx]
    vclipped = torch.clamp(values, old_v - value_clip, old_v + value_clip)
    vf_loss = 0.5 * torch.sum(torch.maximum((values - ret) ** 2, (vclipped - ret) ** 2) * mask) / n
    ratio = torch.exp((lp - exp.logprobs[idx]) * mask)
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - pg_clip, 1.0 + pg_clip))
    return torch.sum(pg * mask) / n + vf_loss_weight * vf_loss


def build_optimizer(policy, critic, *, lr: float, critic_lr: float, eps: float = 1e-6,
                    betas: tuple = (0.9, 0.95)) -> torch.optim.AdamW:
    """``build_optimizer``: one AdamW, a policy group (lr, ``eps``) and a critic group (critic_lr,
    1e-8), weight decay 0 in both (``get_parms``' two groups per model carry the same settings)."""
    groups = [
        {"params": [p for p in policy.parameters() if p.requires_grad], "lr": lr, "eps": eps, "weight_decay": 0.0},
        {"params": [p for p in critic.parameters() if p.requires_grad], "lr": critic_lr, "eps": 1e-8,
         "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, eps=eps, betas=betas)
