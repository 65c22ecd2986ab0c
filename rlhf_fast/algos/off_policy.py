"""The off-policy correction of asynchronous rollouts (``ppo.rollout``; docs/architecture.md,
"Asynchronous rollouts"): per-token importance weights between the proximal policy and the
behaviour policy, as a registry of corrections.

Three policies meet in one asynchronous PPO update:

- the *behaviour* policy pi_behav drew the tokens: the rollout worker's weight snapshot, up to
  ``max_staleness`` updates old; its log-probs are the engine's own (``Responses.logprobs``);
- the *proximal* policy pi_prox: the trainer's weights at the start of the update (the log-probs
  the trainer recomputes in the first epoch's micro-batches, so the first minibatch's ratio is
  exactly 1);
- the policy being trained, pi_theta.

The decoupled PPO objective (Hilton, Cobbe, Schulman 2022, "Batch size-invariance for policy
optimization", eq. 2; AReaL, Fu et al. 2025, "AReaL: a large-scale asynchronous reinforcement
learning system for language reasoning", section 5.2, eq. 5) clips the ratio against the proximal
policy and corrects the sampling with the weight pi_prox / pi_behav, per token:

    w     = pi_prox(a|s) / pi_behav(a|s)                       (a constant: no gradient)
    loss  = w * max(-A * r, -A * clip(r, 1 - eps_low, 1 + eps_high)),   r = pi_theta / pi_prox

Since w >= 0 it factors into the advantage: ``w * max(-A r, -A clip(r)) = max(-(wA) r,
-(wA) clip(r))`` (and the dual clip's ``min(., -A c)`` the same way), so the trainer passes
``w * A`` to the registered policy loss and every token-level loss becomes its decoupled form
(``decoupled_advantages``); ``rlhf_fast/reference/off_policy.py`` writes the objective out per token
and the tests hold the two to each other. Truncated importance sampling (IMPALA's rho-bar, Espeholt
et al. 2018, eq. 1; "TIS", Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training") caps the weight, ``min(w, C)``, trading a bias for a bounded variance.
With staleness 0 the behaviour log-probs are the proximal ones up to float32 rounding (the hybrid
engine's log-probs are the trainer's model code on the same weights; ``generation/logprob_gap_max``),
so ``w`` is 1 within that gap; where they are equal bit for bit ``w`` is exactly 1 and the loss and
its gradient are the synchronous ones bit for bit (tests/test_off_policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_fast.algos.registry import Registry

Tensor = torch.Tensor


@dataclass(frozen=True)
class OffPolicyCorrection:
    """A registered correction: ``truncates`` says whether the weight is capped at
    ``ppo.rollout.importance_weight_cap`` (the config requires the cap then)."""

    name: str
    truncates: bool

    def weights(self, proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor,
                cap: Optional[float] = None) -> Tensor:
        return behaviour_weights(proximal_logprobs, behaviour_logprobs, mask, cap=cap if self.truncates else None)


OFF_POLICY_CORRECTIONS: Registry[OffPolicyCorrection] = Registry("off-policy correction")
OFF_POLICY_CORRECTIONS.register("decoupled")(OffPolicyCorrection("decoupled", truncates=False))
OFF_POLICY_CORRECTIONS.register("truncated_is")(OffPolicyCorrection("truncated_is", truncates=True))


def behaviour_weights(proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *,
                      cap: Optional[float] = None) -> Tensor:
    """(..., T) importance weights ``exp(prox - behav)`` (float32, float64 for float64 inputs), capped
    at ``cap`` (None: not capped), 0 on padding. A sampled token outside the proximal policy's top-k / top-p set has
    proximal log-prob -inf: weight 0 (the proximal policy would never draw it)."""
    if proximal_logprobs.shape != behaviour_logprobs.shape or mask.shape != proximal_logprobs.shape:
        raise ValueError(f"proximal_logprobs {tuple(proximal_logprobs.shape)}, behaviour_logprobs "
                         f"{tuple(behaviour_logprobs.shape)} and mask {tuple(mask.shape)} must have one shape")
    if cap is not None and not cap > 0:
        raise ValueError(f"cap must be None or > 0, got {cap}")
    m = mask.bool()
    dt = torch.promote_types(torch.promote_types(proximal_logprobs.dtype, behaviour_logprobs.dtype), torch.float32)
    zero = torch.zeros((), dtype=dt, device=proximal_logprobs.device)
    logw = torch.where(m, proximal_logprobs.to(dt) - behaviour_logprobs.to(dt), zero)  # (..., T)
    w = torch.exp(logw)
    if cap is not None:
        w = w.clamp(max=cap)
    return torch.where(m, w, zero)


def decoupled_advantages(advantages: Tensor, weights: Optional[Tensor]) -> Tensor:
    """The advantages a token-level policy loss needs for the decoupled objective: ``w * A``
    (see the module docstring; ``weights`` None: no correction, ``advantages`` as they are)."""
    return advantages if weights is None else advantages * weights


@dataclass
class WeightStats:
    """Importance-weight statistics of one batch over its valid tokens (``async/is_weight_*``):
    mean, min, max of w = pi_prox / pi_behav before any cap, and the fraction of tokens the cap
    truncated (0 without one)."""

    mean: float
    min: float
    max: float
    truncated_frac: float

    @classmethod
    def of(cls, proximal_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor,
           cap: Optional[float] = None) -> "WeightStats":
        m = mask.bool()
        if not bool(m.any()):  # host sync, once per iteration
            return cls(1.0, 1.0, 1.0, 0.0)
        w = behaviour_weights(proximal_logprobs, behaviour_logprobs, m)[m].double()  # (n,) uncapped
        trunc = float((w > cap).double().mean()) if cap is not None else 0.0
        return cls(float(w.mean()), float(w.min()), float(w.max()), trunc)

    def to_dict(self) -> dict:
        return {"async/is_weight_mean": self.mean, "async/is_weight_min": self.min,
                "async/is_weight_max": self.max, "async/is_truncated_frac": self.truncated_frac}


def off_policy_correction_names() -> tuple[str, ...]:
    """The values ``ppo.rollout.correction`` accepts."""
    return OFF_POLICY_CORRECTIONS.names()
