"""The data order of a dataset stage (SFT, reward model) and of PPO's prompts: a permutation per
epoch seeded by (seed, epoch) only, never by the rank or world size, and each rank's contiguous
slice of a global batch. A resumed run skips the batches it has done, so it repeats the
uninterrupted one."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from rlhf_fast.config import BatchPlan


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation seeded by (seed, epoch), the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def rank_micro_batches(global_batch: Sequence[int], plan: BatchPlan, rank: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch: rank r takes the r-th contiguous slice of
    ``batch_size / world_size`` examples and cuts it into ``grad_accum`` micro-batches."""
    per_rank = plan.batch_size // plan.world_size
    mine = list(global_batch[rank * per_rank : (rank + 1) * per_rank])
    m = plan.micro_batch_size
    return [mine[i : i + m] for i in range(0, per_rank, m)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size  # the last, incomplete global batch of an epoch is dropped


def total_steps_of(n: int, batch_size: int, epochs: float, max_steps: Optional[int]) -> int:
    per_epoch = steps_per_epoch(n, batch_size)
    if per_epoch == 0:
        raise ValueError(f"the training set has {n} examples, fewer than one global batch ({batch_size})")
    return max_steps if max_steps is not None else max(1, int(round(epochs * per_epoch)))
