"""Left padding and collators. Every batch carries ``position_ids = cumsum(mask) - mask`` so that
a left-padded row sees the positions it would see unpadded ("The N Implementation Details of
RLHF with PPO" #3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

IGNORE_INDEX = -100


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - mask`` clamped at 0 (same as ``rlhf_fast.models.position_ids_from_mask``;
    repeated here so the data layer does not import the model layer)."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - mask).clamp_(min=0)


def _target_length(longest: int, length: Optional[int], multiple: Optional[int]) -> int:
    if length is not None:
        if longest > length:
            raise ValueError(f"a sequence has {longest} tokens, more than the fixed length {length}")
        return length
    if multiple:
        return -(-longest // multiple) * multiple
    return longest


def left_pad(
    sequences: Sequence[Sequence[int]],
    pad_value: int,
    *,
    length: Optional[int] = None,
    pad_to_multiple_of: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads integer sequences to one length: ``length`` exactly when given (ValueError if a
    sequence is longer), else the longest rounded up to ``pad_to_multiple_of``. Returns
    ``(values (B, L) int64, attention_mask (B, L) int64)``."""
    seqs = [torch.as_tensor(s, dtype=torch.long).flatten() for s in sequences]
    L = _target_length(max((len(s) for s in seqs), default=0), length, pad_to_multiple_of)
    out = torch.full((len(seqs), L), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, L - len(s) :] = s
            mask[i, L - len(s) :] = 1
    return out, mask


@dataclass
class PromptCollator:
    """Prompts -> ``input_ids``, ``attention_mask``, ``position_ids`` (B, L), left-padded with
    ``pad_token_id``; ``pad_to_length`` fixes L (N details #2: queries padded to a fixed length),
    and ``index`` (B,) holds each example's dataset index (-1 when an item has none)."""

    pad_token_id: int
    pad_to_length: Optional[int] = None
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, items: Sequence[dict]) -> dict:
        ids, mask = left_pad([it["input_ids"] for it in items], self.pad_token_id,
                             length=self.pad_to_length, pad_to_multiple_of=self.pad_to_multiple_of)
        return {
            "input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask),
            "index": torch.tensor([it.get("index", -1) for it in items], dtype=torch.long),
        }


@dataclass
class SFTCollator:
    """Prompt + response sequences -> ``input_ids``, ``attention_mask``, ``position_ids`` and
    ``labels`` (B, L), left-padded; labels are ``IGNORE_INDEX`` on padding (and on the prompt
    unless the dataset trains on it). Labels are aligned with ``input_ids`` (HF convention: the
    model shifts them)."""

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, items: Sequence[dict]) -> dict:
        ids, mask = left_pad([it["input_ids"] for it in items], self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)
        labels, _ = left_pad([it["labels"] for it in items], IGNORE_INDEX, length=ids.shape[1])
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask), "labels": labels}


@dataclass
class PreferenceCollator:
    """Pairs -> one left-padded batch of 2B rows: rows ``0..B-1`` are the chosen sequences, rows
    ``B..2B-1`` the rejected ones (one reward-model forward scores both), with ``input_ids``,
    ``attention_mask``, ``position_ids`` (2B, L) and ``num_pairs`` = B."""

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, items: Sequence[dict]) -> dict:
        seqs = [it["chosen_input_ids"] for it in items] + [it["rejected_input_ids"] for it in items]
        ids, mask = left_pad(seqs, self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)
        return {
            "input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask),
            "num_pairs": len(items),
        }
