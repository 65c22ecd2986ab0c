"""Where the KL regulariser goes (registry): "in_reward" — a per-token ``-beta * kl`` reward
(Ziegler et al. 2019; "N details" #17; TRL, N+ TL;DR, PPO-max) — or "in_loss" — ``beta * kl``
added to the policy loss (GRPO; verl ``use_kl_loss``), with the reward then the bare score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_fast.algos.backend import resolve
from rlhf_fast.algos.registry import Registry


@dataclass(frozen=True)
class KLPlacement:
    """in_reward: the KL coefficient goes into ``shape_rewards``; otherwise into the loss."""

    in_reward: bool

    @property
    def in_loss(self) -> bool:
        """The policy loss carries a ``coef * kl`` term (``algos.kl_loss``)."""
        return not self.in_reward

    def reward_coef(self, kl_coef: float) -> float:
        return float(kl_coef) if self.in_reward else 0.0

    def loss_coef(self, kl_coef: float) -> float:
        return 0.0 if self.in_reward else float(kl_coef)


KL_PLACEMENTS: Registry[KLPlacement] = Registry("KL placement")
KL_PLACEMENTS.register("in_reward")(KLPlacement(in_reward=True))
KL_PLACEMENTS.register("in_loss")(KLPlacement(in_reward=False))


def compute_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    placement: str = "in_reward",
    estimator: str = "k1",
    clamp: Optional[float] = None,
    backend=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards, kl)``, both (B, T): ``shape_rewards`` with beta = ``kl_coef`` for "in_reward"
    and 0 for "in_loss" (the score alone at the last valid token). ``kl`` is the per-token
    estimate either way (for logging and for ``objective/kl``)."""
    coef = KL_PLACEMENTS[placement].reward_coef(kl_coef)
    return resolve(backend).shape_rewards(
        scores, logprobs, ref_logprobs, mask, kl_coef=coef, estimator=estimator, clamp=clamp
    )
