"""Group sampling's shared prefill: the rows of a group (``samples_per_prompt`` copies of one
prompt, next to each other: ``trainers/rollout.py`` ``PromptSchedule``) need the prompt's forward
once. ``plan`` finds runs of identical consecutive rows (ids and mask); the eager decoder
(``engine/eager.py``) then runs the prefill on one row per run and broadcasts its KV and
last-token logits to the run's rows (``cache.select_rows`` with repeated indices).

Sampling is unchanged: the uniforms are keyed by (seed, step, row in the call)
(``sampling.counter_uniform``), never by the prefill's batch, so each row of a group draws the
tokens it draws when it is decoded alone (``tests/test_engine_groups.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class SharedPrefill:
    """first: (U,) int64, one row per run of identical rows; expand: (B,) int64, the run of each
    row (an index into ``first``'s rows), non-decreasing."""

    first: torch.Tensor
    expand: torch.Tensor

    @property
    def saved_rows(self) -> int:
        return self.expand.numel() - self.first.numel()


def plan(ids: torch.Tensor, mask: torch.Tensor) -> Optional[SharedPrefill]:
    """The runs of identical consecutive rows of left-padded prompts ``ids`` / ``mask`` (B, P);
    None when every row differs from the one before (nothing to share). One host sync (the run
    count), once per chunk."""
    B = ids.shape[0]
    if B < 2:
        return None
    key = torch.cat([ids, mask.to(ids.dtype)], 1)  # (B, 2P)
    new_run = torch.ones(B, dtype=torch.bool, device=ids.device)
    new_run[1:] = (key[1:] != key[:-1]).any(-1)
    expand = new_run.long().cumsum(0) - 1  # (B,) run index of each row
    first = new_run.nonzero().flatten()  # (U,) host sync: the number of runs
    if first.numel() == B:
        return None
    return SharedPrefill(first=first, expand=expand)
