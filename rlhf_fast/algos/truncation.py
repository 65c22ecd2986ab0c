"""Response post-processing before scoring: truncation after the first stop token (the EOS
trick, N+ TL;DR; "N details" #14's '.' after token 16), detection of a missing stop token, and
the missing-stop penalty (registry: "replace" the score, N+ / lm-human-preferences; "subtract"
from it, TRL's ``missing_eos_penalty``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from rlhf_fast.algos.registry import Registry

Tensor = torch.Tensor


@dataclass(frozen=True)
class Truncation:
    """response_ids: (B, R), pad after the stop token. response_mask: (B, R) bool, True up to and
    including the stop token (all valid input tokens when there is none). has_stop: (B,) bool.
    stop_index: (B,) long, the stop token's position, -1 when there is none."""

    response_ids: Tensor
    response_mask: Tensor
    has_stop: Tensor
    stop_index: Tensor


def first_stop_index(
    response_ids: Tensor, stop_token_ids: Sequence[int] | int, *, min_length: int = 0, response_mask: Optional[Tensor] = None
) -> Tensor:
    """(B,) long: position of the first stop token at index >= ``min_length`` (0-based) among the
    valid tokens, -1 when there is none. ``min_length=16`` with '.' is lm-human-preferences'
    ``truncate_after`` ("N details" #14)."""
    if response_ids.dim() != 2:
        raise ValueError(f"response_ids must be (B, R), got shape {tuple(response_ids.shape)}")
    stops = torch.as_tensor(
        [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids),
        dtype=response_ids.dtype, device=response_ids.device,
    )
    if stops.numel() == 0:
        raise ValueError("stop_token_ids must name at least one token")
    R = response_ids.shape[-1]
    pos = torch.arange(R, device=response_ids.device)
    is_stop = torch.isin(response_ids, stops) & (pos >= min_length)
    if response_mask is not None:
        is_stop &= response_mask.bool()
    first = torch.where(is_stop, pos, R).amin(-1) if R > 0 else torch.full(response_ids.shape[:1], R, device=pos.device)
    return torch.where(first < R, first, -1)


def truncate_at_stop(
    response_ids: Tensor,
    stop_token_ids: Sequence[int] | int,
    *,
    pad_token_id: int,
    min_length: int = 0,
    response_mask: Optional[Tensor] = None,
) -> Truncation:
    """Keep each response up to and including its first stop token (at index >= ``min_length``)
    and replace what follows with ``pad_token_id``; rows without one are kept whole (the EOS
    trick: sample a fixed number of tokens, truncate afterwards; N+ TL;DR). ``response_mask``
    (B, R): already-invalid tokens (e.g. the generator's own padding) stay invalid."""
    stop = first_stop_index(response_ids, stop_token_ids, min_length=min_length, response_mask=response_mask)
    has_stop = stop >= 0
    R = response_ids.shape[-1]
    last = torch.where(has_stop, stop, R - 1)
    keep = torch.arange(R, device=response_ids.device) <= last.unsqueeze(-1)
    if response_mask is not None:
        keep &= response_mask.bool()
    ids = torch.where(keep, response_ids, torch.full_like(response_ids, pad_token_id))
    return Truncation(response_ids=ids, response_mask=keep, has_stop=has_stop, stop_index=stop)


MISSING_STOP_PENALTIES: Registry[Callable[[Tensor, Tensor, float], Tensor]] = Registry("missing-stop penalty")


@MISSING_STOP_PENALTIES.register("replace")
def _replace(scores: Tensor, has_stop: Tensor, value: float) -> Tensor:
    """score = value (-1 in lm-human-preferences and N+ TL;DR) for rows without a stop token."""
    return torch.where(has_stop, scores, torch.full_like(scores, value))


@MISSING_STOP_PENALTIES.register("subtract")
def _subtract(scores: Tensor, has_stop: Tensor, value: float) -> Tensor:
    """score -= value for rows without a stop token (TRL ``missing_eos_penalty``)."""
    return torch.where(has_stop, scores, scores - value)


def apply_missing_stop_penalty(scores: Tensor, has_stop: Tensor, *, mode: Optional[str], value: float) -> Tensor:
    """Penalise the (B,) ``scores`` of rows whose ``has_stop`` is False; ``mode=None``: unchanged."""
    if mode is None:
        return scores
    if tuple(has_stop.shape) != tuple(scores.shape):
        raise ValueError(f"has_stop must have the shape of scores {tuple(scores.shape)}, got {tuple(has_stop.shape)}")
    return MISSING_STOP_PENALTIES[mode](scores, has_stop.bool(), float(value))


@dataclass(frozen=True)
class TruncationParams:
    """Response post-processing settings (stop token ids are the tokenizer's: given at call time)."""

    min_length: int = 0
    """only stop tokens at index >= min_length count ("N details" #14: '.' at or after token 16)."""
    penalty: Optional[str] = "replace"
    """missing-stop penalty: "replace" (lm-human-preferences, N+ TL;DR), "subtract" (TRL), None."""
    penalty_value: float = -1.0
    """the replacement score (-1, "N details" #14 and N+) or the amount subtracted (TRL)."""


TRUNCATION_PRESETS = {
    "lm_human_preferences": TruncationParams(min_length=16, penalty="replace", penalty_value=-1.0),
    "tldr": TruncationParams(min_length=0, penalty="replace", penalty_value=-1.0),
    "ppo_max": TruncationParams(min_length=0, penalty=None),
}
