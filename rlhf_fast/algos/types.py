"""Typed containers for one PPO iteration (docs/architecture.md, "Conventions"): the rollout batch and its statistics.

Shapes: B rollouts (prompts x samples), Q query (prompt) tokens, R response tokens. Every
per-token tensor is aligned with ``response_ids``: entry ``[b, t]`` is about the token
``response_ids[b, t]`` (its log-prob, the value of the state that predicts it, its reward).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Optional

import torch

@dataclass
class Rollout:
    """One batch of experience. The first five fields come from generation and scoring; the
    rest are filled by the experience / advantage phases (``None`` until then).

    query_ids: (B, Q) long, left-padded prompts ("N details" #2, #3).
    query_mask: (B, Q) bool, True on prompt tokens.
    response_ids: (B, R) long, the sampled responses PPO trains on: padded after the stop token
        (EOS trick, ``generation.after_stop`` "masked") or every sampled token ("trained",
        lm-human-preferences); ``algos.postprocess_responses`` makes both views.
    response_mask: (B, R) bool, the tokens PPO trains on: up to and including the stop token
        ("masked"), or every sampled token ("trained").
    scores: (B,) float, sequence scores of the responses truncated after their stop token, from
        the reward model / function, after any missing-stop penalty and score clipping.
    logprobs: (B, R) float32, log-probs of the response tokens under the policy that sampled
        them, at the sampling temperature ("old" log-probs of the PPO ratio).
    ref_logprobs: (B, R) float32, the same under the frozen reference policy.
    values: (B, R) float32, the critic's values of the states that predict each response token
        (None without a critic: grpo / rloo).
    kl: (B, R) per-token KL estimate ``kl_penalty(logprobs, ref_logprobs)``, 0 on padding.
    rewards: (B, R) per-token rewards: ``-beta * kl`` (KL in the reward) plus the score at the
        last valid token of ``response_mask`` ("N details" #17): the stop token ("masked") or the
        last sampled token ("trained", lm-human-preferences ``rewards[:, -1] += scores``).
    advantages: (B, R), returns: (B, R): from the advantage estimator; 0 on padding.
    group_ids: (B,) long, rows with the same id answer the same prompt (grpo / rloo baselines).
    is_weights: (B, R) float32, the off-policy correction's per-token importance weights
        pi_prox / pi_behav of a stale batch (asynchronous rollouts, ``algos/off_policy.py``; the
        policy loss sees ``is_weights * advantages``), 0 on padding; None: no correction.
    action_mask: (B, R) bool, multi-turn episodes only (docs/architecture.md, "Multi-turn
        episodes"): the model's own tokens, a subset of ``response_mask`` (which then also holds
        the environment's tokens, attended to by every forward). The policy loss, the KL, the
        rewards, the advantages and the value targets cover ``train_mask``: this mask when set, else
        ``response_mask``. None: a single-turn rollout (every response token is the model's).
    turn_rewards: (B, R) float32, multi-turn only: the environment's reward of every turn but the
        last, at the last model token of the turn it answered (the last turn's reward is ``scores``);
        added to ``rewards`` by ``finish_experience``. None: no turn rewards.
    """

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    scores: torch.Tensor
    logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None
    rewards: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    returns: Optional[torch.Tensor] = None
    group_ids: Optional[torch.Tensor] = None
    is_weights: Optional[torch.Tensor] = None
    action_mask: Optional[torch.Tensor] = None
    turn_rewards: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        B, R = self.response_ids.shape[0], self.response_ids.shape[-1]
        if self.query_ids.dim() != 2 or self.response_ids.dim() != 2:
            raise ValueError(
                f"query_ids and response_ids must be (B, Q) and (B, R), got {tuple(self.query_ids.shape)} "
                f"and {tuple(self.response_ids.shape)}"
            )
        expected = {"query_mask": tuple(self.query_ids.shape), "response_mask": (B, R), "scores": (B,)}
        expected.update({k: (B, R) for k in ("logprobs", "ref_logprobs", "values", "kl", "rewards", "advantages", "returns",
                                          "is_weights", "action_mask", "turn_rewards")})
        expected["group_ids"] = (B,)
        expected["query_ids"] = (B, self.query_ids.shape[-1])
        for name, shape in expected.items():
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"Rollout.{name} must have shape {shape}, got {tuple(t.shape)}")
        self.query_mask = self.query_mask.bool()
        self.response_mask = self.response_mask.bool()
        if self.action_mask is not None:
            self.action_mask = self.action_mask.bool()
            if bool((self.action_mask & ~self.response_mask).any()):
                raise ValueError("Rollout.action_mask must be a subset of response_mask (model tokens are response tokens)")

    @property
    def train_mask(self) -> torch.Tensor:
        """(B, R) bool: the tokens the RL math covers: ``action_mask`` (multi-turn) or ``response_mask``."""
        return self.response_mask if self.action_mask is None else self.action_mask

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_start(self) -> int:
        """Index of the first response token in ``sequences`` (= Q)."""
        return self.query_ids.shape[-1]

    # Joined once per Rollout and kept (a Rollout is never mutated: ``replace`` / ``select`` make
    # new ones), so the policy, critic and reference forwards of one micro-batch share one copy.
    @functools.cached_property
    def sequences(self) -> torch.Tensor:
        """(B, Q + R) long: prompt and response."""
        return torch.cat([self.query_ids, self.response_ids], dim=-1)

    @functools.cached_property
    def attention_mask(self) -> torch.Tensor:
        """(B, Q + R) bool: prompt mask and response mask (tokens after the stop are padding)."""
        return torch.cat([self.query_mask, self.response_mask], dim=-1)

    @classmethod
    def row_fields(cls) -> tuple[str, ...]:
        """The per-row tensor fields (every field: each has the batch as its first dimension)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def select(self, index: torch.Tensor) -> "Rollout":
        """The rows ``index`` (a (b,) long tensor) of every per-row field: a minibatch."""
        return self.map(lambda t: t[index])

    def map(self, fn) -> "Rollout":
        """A Rollout with ``fn`` applied to every field that is set (None fields stay None)."""
        return Rollout(**{k: (None if getattr(self, k) is None else fn(getattr(self, k))) for k in self.row_fields()})

    def replace(self, **changes) -> "Rollout":
        return dataclasses.replace(self, **changes)


# ---- statistics -----------------------------------------------------------------------------

#: attribute -> the metric name users know from TRL / the N-details code
MINIBATCH_METRIC_NAMES = {
    "loss": "loss/total",
    "policy_loss": "loss/policy",
    "value_loss": "loss/value",
    "kl_loss": "loss/kl",
    "approxkl": "policy/approxkl",
    "clipfrac": "policy/clipfrac",
    "entropy": "policy/entropy",
    "ratio_mean": "policy/ratio_mean",
    "ratio_max": "policy/ratio_max",
    "dual_clipfrac": "policy/dual_clipfrac",
    "outside_filter_frac": "policy/outside_filter_frac",
    "vf_clipfrac": "val/clipfrac",
    "vpred": "val/vpred",
    "verror": "val/error",
}

OBJECTIVE_METRIC_NAMES = {
    "kl": "objective/kl",
    "entropy": "objective/entropy",
    "scores": "objective/scores",
    "non_score_reward": "objective/non_score_reward",
    "rlhf_reward": "objective/rlhf_reward",
    "response_length": "objective/response_length",
    "kl_coef": "kl_coef",
}


def _zero() -> torch.Tensor:
    return torch.zeros(())


@dataclass
class MinibatchStats:
    """Statistics of one minibatch update, each a 0-dim detached tensor (no host sync until
    ``to_dict``). Token means are over the minibatch's valid response tokens.

    loss: the total loss that was back-propagated (policy + vf_coef * value - ent_coef * entropy
        + KL-in-loss term). policy_loss / value_loss / kl_loss: its parts (value_loss already
        includes the 0.5 of baselines ppo2, not vf_coef).
    approxkl: 0.5 * mean((logp - old_logp)^2) (the N-details code). clipfrac: fraction of tokens
        where the clipped surrogate is the active one. entropy: mean policy entropy.
    ratio_mean / ratio_max: mean / max of exp(logp - old_logp). dual_clipfrac: fraction of
        tokens whose loss the dual clip capped (0 without ``dual_clip``). outside_filter_frac:
        fraction of tokens that left the updated policy's top-k / top-p set (log-prob -inf, ratio
        0; approxkl and the ratio statistics cover the others).
    vf_clipfrac: fraction of tokens where the clipped value error is the larger. vpred: mean
        new value. verror: mean squared error (v - returns)^2.
    """

    loss: torch.Tensor = field(default_factory=_zero)
    policy_loss: torch.Tensor = field(default_factory=_zero)
    value_loss: torch.Tensor = field(default_factory=_zero)
    kl_loss: torch.Tensor = field(default_factory=_zero)
    approxkl: torch.Tensor = field(default_factory=_zero)
    clipfrac: torch.Tensor = field(default_factory=_zero)
    entropy: torch.Tensor = field(default_factory=_zero)
    ratio_mean: torch.Tensor = field(default_factory=_zero)
    ratio_max: torch.Tensor = field(default_factory=_zero)
    dual_clipfrac: torch.Tensor = field(default_factory=_zero)
    outside_filter_frac: torch.Tensor = field(default_factory=_zero)
    vf_clipfrac: torch.Tensor = field(default_factory=_zero)
    vpred: torch.Tensor = field(default_factory=_zero)
    verror: torch.Tensor = field(default_factory=_zero)

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, attr)) for attr, name in MINIBATCH_METRIC_NAMES.items()}


@dataclass
class ObjectiveStats:
    """Statistics of the rollout batch (before the update), TRL's ``objective/*`` names.

    kl: mean over rows of the summed per-token KL. entropy: mean over rows of ``-sum(logprobs)``
    (a sample estimate of the sequence entropy). scores: mean score. non_score_reward: mean over
    rows of ``-kl_coef * sum(kl)``. rlhf_reward: scores + non_score_reward. response_length: mean
    number of valid response tokens. kl_coef: the beta used for this batch.
    """

    kl: torch.Tensor
    entropy: torch.Tensor
    scores: torch.Tensor
    non_score_reward: torch.Tensor
    rlhf_reward: torch.Tensor
    response_length: torch.Tensor
    kl_coef: float

    def to_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, attr)) for attr, name in OBJECTIVE_METRIC_NAMES.items()}


def objective_stats(rollout: Rollout, kl_coef: float) -> ObjectiveStats:
    """``ObjectiveStats`` of a rollout whose ``logprobs`` and ``kl`` are filled."""
    if rollout.logprobs is None or rollout.kl is None:
        raise ValueError("objective_stats needs rollout.logprobs and rollout.kl")
    m = rollout.train_mask  # the model's tokens (multi-turn: the environment's are not the policy's)
    zero = torch.zeros((), dtype=rollout.kl.dtype, device=m.device)
    kl_sum = torch.where(m, rollout.kl, zero).sum(-1)
    neg_lp = torch.where(m, -rollout.logprobs, torch.zeros_like(zero, dtype=rollout.logprobs.dtype)).sum(-1)
    non_score = -kl_coef * kl_sum
    scores = rollout.scores.to(kl_sum.dtype)
    return ObjectiveStats(
        kl=kl_sum.mean().detach(),
        entropy=neg_lp.mean().detach(),
        scores=scores.mean().detach(),
        non_score_reward=non_score.mean().detach(),
        rlhf_reward=(scores + non_score).mean().detach(),
        response_length=m.sum(-1).to(kl_sum.dtype).mean(),
        kl_coef=float(kl_coef),
    )


@dataclass
class PPOStats:
    """Everything one PPO iteration reports: the rollout's objective statistics and one
    ``MinibatchStats`` per optimizer step (epoch-major order)."""

    objective: ObjectiveStats
    minibatches: list[MinibatchStats]

    def to_dict(self) -> dict[str, float]:
        """Objective stats plus the minibatch stats averaged over the iteration (``ratio_max``:
        the maximum), under their TRL / N-details names."""
        out = self.objective.to_dict()
        if self.minibatches:
            for attr, name in MINIBATCH_METRIC_NAMES.items():
                vals = torch.stack([getattr(s, attr).detach().double().cpu() for s in self.minibatches])
                out[name] = float(vals.max() if attr == "ratio_max" else vals.mean())
        return out
