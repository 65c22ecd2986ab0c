"""Micro-batches cut to the columns their rows attend to (``ppo.algo.trim_padding``).

With stop tokens most responses end well before ``max_new_tokens``: the rollout's (b, Q + R)
sequences then carry trailing columns that are padding in every row of a micro-batch (and
left-padded prompts may carry leading ones). No valid token attends to a padding key and every
loss masks padded positions, so the forward of the valid tokens does not depend on those columns:
``trim_padding`` drops them before the model runs and ``pad_response`` gives the (b, L) outputs
their (b, R) shape back with zeros (which every consumer masks: ``ppo_core._micro_loss`` /
``_minibatch_stats`` by ``response_mask``, ``ppo_core.finish_experience`` the values).

Same math, not the same bits: the CPU attention kernel sums over a shorter key axis and the
weight-gradient GEMMs over fewer (zero) token rows, so float32 results move by rounding only
(``tests/test_ppo_trim.py`` holds them to the numerical contract of docs/architecture.md). Every
forward of a micro-batch (old, reference, values, the update's) sees the same trimmed shape, so
the first minibatch's ratio stays exactly 1.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from rlhf_fast.algos import Rollout


def trim_padding(batch: Rollout, *, multiple: int = 1, extra: int = 0) -> Rollout:
    """The sequences of ``batch`` without the leading prompt columns and trailing response columns
    that are padding in every row: a Rollout of query / response ids and masks and scores only
    (what a forward reads), responses (b, L) with L >= 1. ``multiple``: round the kept sequence
    length Q' + L up to a multiple of it (more response columns, never past R); 16 keeps the CPU
    attention kernel's summation (16 float32 lanes on AVX-512, two vectors on AVX2) and with it the
    forward's bits (tests/test_ppo_trim.py). ``extra``: response columns kept past the last one any
    row attends (never past R): the values one token past the stop (``algo.score_position``
    "after_stop") are read from the state of the stop token, at output column last + 1."""
    q_mask, r_mask = batch.query_mask, batch.response_mask
    R = r_mask.shape[1]
    q_cols = q_mask.any(0)  # (Q,) one reduction each; the host sync below is the shape itself
    r_cols = r_mask.any(0)  # (R,)
    first, last = _bounds(q_cols, r_cols)
    Q = q_mask.shape[1] - first
    L = min(max(last, 1) + extra, R)
    L = min(-(-(Q + L) // multiple) * multiple - Q, R)
    if first == 0 and L == R:
        return batch
    return Rollout(batch.query_ids[:, first:], q_mask[:, first:], batch.response_ids[:, :L], r_mask[:, :L],
                   batch.scores)


def _bounds(q_cols: torch.Tensor, r_cols: torch.Tensor) -> tuple[int, int]:
    """(first prompt column any row attends, 1 + last response column any row attends); one host
    sync (a shape is a host value)."""
    Q, R = q_cols.numel(), r_cols.numel()
    idx = torch.cat([torch.where(q_cols, torch.arange(Q, device=q_cols.device), Q),
                     torch.where(r_cols, torch.arange(1, R + 1, device=r_cols.device), 0)])
    first, last = idx[:Q].min(), idx[Q:].max()
    first, last = torch.stack([first, last]).tolist()  # host sync: the shapes of the trimmed forward
    return min(first, Q - 1) if Q else 0, last


def trim_columns(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, T) ids and mask without the leading and trailing columns that are padding in every row
    (the reward model's forward in ``rollout.Scorer``: its score is read at each row's last valid
    token, so those columns change nothing but the float32 rounding of attention). One host sync."""
    cols = mask.bool().any(0)  # (T,)
    T = cols.numel()
    pos = torch.arange(T, device=cols.device)
    first, last = torch.stack([torch.where(cols, pos, T).min(), torch.where(cols, pos, -1).max()]).tolist()
    if last < first:  # no valid token at all: keep one column
        first, last = 0, 0
    if first == 0 and last == T - 1:
        return ids, mask
    return ids[:, first : last + 1], mask[:, first : last + 1]


def pad_response(x: Optional[torch.Tensor], R: int) -> Optional[torch.Tensor]:
    """(b, L) -> (b, R), zeros appended (differentiable: its backward is the slice)."""
    if x is None or x.shape[-1] == R:
        return x
    return F.pad(x, (0, R - x.shape[-1]))
