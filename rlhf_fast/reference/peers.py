"""The peers' ways of computing the same things, written from their semantics; each function's
docstring names the upstream function it follows, in TRL (https://github.com/huggingface/trl,
``trl/trainer/utils.py``, ``trl/trainer/ppo_trainer.py``), DeepSpeed-Chat
(https://github.com/deepspeedai/DeepSpeedExamples,
``applications/DeepSpeed-Chat/dschat/rlhf/ppo_trainer.py``) and OpenRLHF
(https://github.com/OpenRLHF/OpenRLHF, ``openrlhf/trainer/ppo_utils/experience_maker.py``).
Benchmarks time them as baselines and tests compare against them; both import them from here so
there is one copy of each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def trl_selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """TRL's ``selective_log_softmax``: float32/64 -> gather minus a per-row logsumexp loop (the
    loop bounds the peak); half precision -> a loop of per-row ``log_softmax`` + gather (in the
    half dtype, as TRL does)."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    return torch.stack([F.log_softmax(row, dim=-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
                        for row, lab in zip(logits, labels)])


def dschat_gather_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """DeepSpeed-Chat's ``gather_log_probs``: the full float32 ``log_softmax``, then gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def trl_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """TRL's PPO GAE (trl/trainer/ppo_trainer.py at f2cd577): rewards and values zeroed where the
    mask is False, then the unmasked ``for t in reversed(range(T))`` loop. Equals ``ops.gae`` for
    right-padded masks. Returns (advantages, returns)."""
    values = torch.masked_fill(values, ~mask, 0)
    rewards = torch.masked_fill(rewards, ~mask, 0)
    advantages = _reversed_gae_loop(rewards, values, gamma, lam)
    return advantages, advantages + values


def openrlhf_gae(rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, gamma: float, lam: float):
    """OpenRLHF's ``get_advantages_and_returns``: rewards and values multiplied by the action mask
    (a NaN at a masked position survives, unlike TRL's masked_fill), the same unmasked loop,
    advantages detached. Returns (advantages, returns)."""
    values = action_mask * values
    rewards = action_mask * rewards
    advantages = _reversed_gae_loop(rewards, values, gamma, lam)
    return advantages.detach(), advantages + values


def _reversed_gae_loop(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """The peers' shared ``for t in reversed(range(T))`` recurrence (no mask: the callers zero
    masked positions first); one ``(B,)`` slice op chain per token."""
    lastgaelam = 0
    advantages_reversed = []
    gen_length = rewards.shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    return torch.stack(advantages_reversed[::-1], dim=1)
