"""The environment protocol: what the multi-turn engine calls (``engine/episodes.py``).

One ``Environment`` object serves one episode at a time: the engine builds one per row from the
factory the config names (``ppo.env``), calls ``reset(prompt)`` with the row's prompt text, then,
each time the model's turn ends (a stop token, or EOS), ``step(turn)`` with the turn's ids and text.

Observations: ``None`` or ``""`` (nothing to append), a ``str`` (tokenised once by the engine with
``add_special_tokens=False``; those ids are what the trainer sees), or a sequence of token ids
(appended as given). Rewards are finite floats; ``done`` ends the episode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

Observation = Union[None, str, Sequence[int]]


@dataclass(frozen=True)
class Turn:
    """One model turn as the environment sees it.

    ids: the turn's token ids as the engine sampled them (the stop token included when there is one).
    text: ``ids`` decoded (special tokens kept, so a tool call's markers are visible).
    index: 0 for the first model turn of the episode.
    stopped: the turn ended with a stop / EOS token (False: the token budget or the turn limit cut it).
    """

    ids: tuple
    text: str
    index: int
    stopped: bool


@dataclass(frozen=True)
class StepResult:
    """``step``'s answer: the observation to append (see the module docstring), the reward of the
    turn just taken, and whether the episode is over."""

    observation: Observation
    reward: float
    done: bool


@runtime_checkable
class Environment(Protocol):
    """``reset(prompt) -> observation``; ``step(turn) -> StepResult`` (or a 3-tuple)."""

    def reset(self, prompt: str) -> Observation: ...

    def step(self, turn: Turn) -> StepResult: ...


def check_step_result(out, *, where: str) -> StepResult:
    """A ``StepResult`` from what ``step`` returned (a ``StepResult`` or an (observation, reward,
    done) tuple), or a ValueError naming ``where`` and what is wrong."""
    if isinstance(out, tuple) and len(out) == 3:
        out = StepResult(*out)
    if not isinstance(out, StepResult):
        raise ValueError(f"{where}: step must return a StepResult or (observation, reward, done), got {out!r}")
    check_observation(out.observation, where=where)
    r = out.reward
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(float(r)):
        raise ValueError(f"{where}: reward must be a finite number, got {r!r}")
    if not isinstance(out.done, bool):
        raise ValueError(f"{where}: done must be True or False, got {out.done!r}")
    return StepResult(out.observation, float(r), out.done)


def check_observation(obs: Observation, *, where: str, vocab_size: Optional[int] = None) -> None:
    """A ValueError naming ``where`` unless ``obs`` is None, a str or a sequence of ids in the vocabulary."""
    if obs is None or isinstance(obs, str):
        return
    if isinstance(obs, (bytes, dict)) or not hasattr(obs, "__iter__"):
        raise ValueError(f"{where}: an observation must be None, a str or a sequence of token ids, got {type(obs).__name__}")
    for t in obs:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
            raise ValueError(f"{where}: observation token {t!r} is not an id in [0, {vocab_size or 'vocab'})")
