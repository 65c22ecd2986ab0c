"""Learning-rate schedules by name (``scheduler.decay``): a registry of shapes, below the trainers
(docs/architecture.md, "Variation points"). ``trainers/deepspeed_setup.py:WarmupDecayLR`` drives
DeepSpeed's optimizer with ``lr_factor``.

A new decay after a linear warm-up is one ``LR_DECAYS`` line (its ``LR_SCHEDULES`` entry follows);
a whole schedule with its own warm-up is one ``LR_SCHEDULES`` line."""

from __future__ import annotations

import math
from typing import Callable

from rlhf_fast._registry import Registry


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, decay: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based): linear warm-up from
    1/(warmup+1) to 1, then "linear" / "cosine" decay to ``min_ratio`` at ``total_steps`` or
    "constant". The last step of a run uses a small positive lr; the value at ``total_steps`` is
    ``min_ratio`` (0: lr annealed to 0, N details #5).

    "invsqrt" is OpenLMLab/MOSS-RLHF's whole schedule (``ppo_trainer.invsqrt_scheduler``), warm-up
    included: ``max(step / w, 0.1)`` for ``step < w``, then ``sqrt(w / step)``, never below 1e-8
    (w = max(warmup_steps, 1); ``total_steps`` and ``min_ratio`` unused)."""
    return LR_SCHEDULES[decay](step, total_steps, warmup_steps, min_ratio)


def _warmup_then(shape: Callable[[float, float], float]):
    """Linear warm-up from 1/(warmup+1) to 1, then ``shape(progress, min_ratio)`` to the end."""

    def factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        return shape(min(1.0, (step - warmup_steps) / span), min_ratio)

    return factor


def _invsqrt(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    w = max(warmup_steps, 1)
    return max(max(step / w, 0.1) if step < w else math.sqrt(w / step), 1e-8)


#: ``scheduler.decay``: (progress in [0, 1] after warm-up, min_ratio) -> multiplier of the peak lr
LR_DECAYS: Registry[Callable[[float, float], float]] = Registry("lr decay")
LR_DECAYS.register("linear")(lambda progress, min_ratio: min_ratio + (1.0 - min_ratio) * (1.0 - progress))
LR_DECAYS.register("cosine")(
    lambda progress, min_ratio: min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
LR_DECAYS.register("constant")(lambda progress, min_ratio: 1.0)

#: ``scheduler.decay`` -> (step, total_steps, warmup_steps, min_ratio) -> multiplier of the peak lr
LR_SCHEDULES: Registry[Callable[[int, int, int, float], float]] = Registry("lr schedule")
for _name in LR_DECAYS.names():
    LR_SCHEDULES.register(_name)(_warmup_then(LR_DECAYS[_name]))
LR_SCHEDULES.register("invsqrt")(_invsqrt)


#: ``ppo.lr_schedule_unit`` -> whether the lr is held for a whole PPO iteration
LR_SCHEDULE_UNITS: Registry[bool] = Registry("lr schedule unit")
LR_SCHEDULE_UNITS.register("optimizer_step")(False)
LR_SCHEDULE_UNITS.register("iteration")(True)


def lr_schedule_names() -> tuple[str, ...]:
    """The values ``scheduler.decay`` accepts."""
    return LR_SCHEDULES.names()
