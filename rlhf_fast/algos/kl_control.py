"""KL coefficient controllers (registry): "fixed" (N+ TL;DR: beta 0.05; PPO-max) and "adaptive"
(Ziegler et al. 2019, lm-human-preferences; "N details" #20). Both checkpoint through
``state_dict`` / ``load_state_dict``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rlhf_fast.algos.registry import Registry


@dataclass
class FixedKLController:
    """beta stays ``value``; ``update`` does nothing."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": float(self.value)}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """Proportional control of beta towards a target KL ("N details" #20)::

        error = clip(current_kl / target - 1, -0.2, 0.2)
        beta *= 1 + error * n_steps / horizon

    ``current_kl``: the batch's mean per-sequence KL (sum over tokens, as ``objective/kl``);
    ``n_steps``: episodes in the batch (lm-human-preferences passes the batch size); ``horizon``
    in episodes. Defaults: init 0.15, target 6, horizon 10000 (lm-human-preferences).
    """

    value: float = 0.15
    target: float = 6.0
    horizon: float = 10000.0

    def __post_init__(self) -> None:
        if not self.target > 0 or not self.horizon > 0:
            raise ValueError(f"target and horizon must be > 0, got {self.target} and {self.horizon}")

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": float(self.value), "target": float(self.target), "horizon": float(self.horizon)}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


KL_CONTROLLERS: Registry[Callable[..., object]] = Registry("KL controller")
KL_CONTROLLERS.register("fixed")(lambda *, init, target=None, horizon=None: FixedKLController(init))
KL_CONTROLLERS.register("adaptive")(
    lambda *, init, target, horizon: AdaptiveKLController(value=init, target=target, horizon=horizon)
)


def make_kl_controller(name: str, *, init: float, target: float = 6.0, horizon: float = 10000.0):
    """A registered controller: ``make_kl_controller("adaptive", init=0.15, target=6, horizon=1e4)``."""
    return KL_CONTROLLERS[name](init=init, target=target, horizon=horizon)
