"""Running score statistics for PPO-max's reward normalisation ("Secrets of RLHF, Part I": reward
normalisation and clipping with running statistics), checkpointed with the trainer."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RunningMoments:
    """Mean and variance of every score seen so far (Chan et al.'s parallel merge of batch
    moments, in float64): ``update(batch)`` then ``normalize(batch)`` = (x - mean) / (std + eps).
    The population variance (divide by n) is used, as a running estimate."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    eps: float = 1e-8

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 0 else 1.0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = float(x.numel())
        if n == 0:
            return
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta**2 * self.count * n / total
        self.count = total

    def normalize(self, x: torch.Tensor, *, shift_mean: bool = True, unbiased: bool = False) -> torch.Tensor:
        """``(x - mean) / (std + eps)``; ``shift_mean=False``: ``x / (std + eps)`` (MOSS-RLHF's
        ``use_reward_scaling`` without ``use_reward_norm``); ``unbiased``: the std with n - 1
        (MOSS-RLHF ``utils.RunningMoments.std``), 1 while fewer than two scores were seen."""
        std = self.std
        if unbiased:
            std = math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0
        centred = x.double() - self.mean if shift_mean else x.double()
        return (centred / (std + self.eps)).to(x.dtype)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])
