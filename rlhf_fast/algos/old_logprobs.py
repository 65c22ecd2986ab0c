"""Where the PPO ratio's old log-probs come from (``ppo.old_logprobs``): a registry below the
trainers (docs/architecture.md, "Variation points"), whose entry says what the trainer and the
config checks need to know."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_fast._registry import Registry


@dataclass(frozen=True)
class OldLogprobSource:
    """from_rollout: the engine's per-token log-probs of the sampled tokens are the old log-probs
    (the policy's log-prob forward over the rollout is skipped); False: the trainer recomputes them
    in the first epoch's micro-batches, so the first minibatch's ratio is exactly 1. An entry with
    ``from_rollout`` needs a generation backend whose log-probs are the trainer's own numbers, drawn
    at the trainer's temperature and filter (the config checks both)."""

    from_rollout: bool


OLD_LOGPROB_SOURCES: Registry[OldLogprobSource] = Registry("old log-prob source")
OLD_LOGPROB_SOURCES.register("recompute")(OldLogprobSource(from_rollout=False))
OLD_LOGPROB_SOURCES.register("rollout")(OldLogprobSource(from_rollout=True))


def old_logprob_source_names() -> tuple[str, ...]:
    """The values ``ppo.old_logprobs`` accepts."""
    return OLD_LOGPROB_SOURCES.names()
