"""Environments for multi-turn episodes (docs/architecture.md, "Multi-turn episodes").

An environment answers the model's turns: ``reset(prompt) -> observation`` once per episode, then
``step(turn) -> StepResult(observation, reward, done)`` after every turn the model ends with a stop
token. Observations are text (tokenised once, by the engine, when they are appended) or token ids
(appended as given). ``ENVIRONMENTS`` holds the built-in ones by name; ``load_environment(spec)``
takes a registered name or ``package.module:Class`` (as ``ppo.reward.function`` takes a function).
"""

from rlhf_fast.envs.protocol import Environment, StepResult, Turn, check_step_result
from rlhf_fast.envs.registry import ENVIRONMENTS, load_environment
from rlhf_fast.envs import calculator  # noqa: F401, E402  (registers "tiny_calculator")

__all__ = ["ENVIRONMENTS", "Environment", "StepResult", "Turn", "check_step_result", "load_environment"]
