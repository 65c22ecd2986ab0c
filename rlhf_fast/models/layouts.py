"""Critic layouts by name (``ppo.critic``): where a PPO run's values come from, a registry below the
trainers (docs/architecture.md, "Variation points"); the entry says which models the trainer builds."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_fast._registry import Registry


@dataclass(frozen=True)
class CriticLayout:
    """Where the values come from (``ppo.critic``): ``value_head`` — a head on the policy's own
    backbone, trained with it (lm-human-preferences); ``separate`` — a critic model with its own
    engine, initialised from the reward model (N+ TL;DR, PPO-max) or else from the policy."""

    value_head: bool
    separate: bool


CRITIC_LAYOUTS: Registry[CriticLayout] = Registry("critic layout")
CRITIC_LAYOUTS.register("value_head")(CriticLayout(value_head=True, separate=False))
CRITIC_LAYOUTS.register("separate")(CriticLayout(value_head=False, separate=True))


def critic_layout_names() -> tuple[str, ...]:
    """The values ``ppo.critic`` accepts."""
    return CRITIC_LAYOUTS.names()
