"""Tokenizer preparation (EOS required, a pad token distinct from EOS, left padding) and prompt /
response encoding with truncation."""

from __future__ import annotations

from typing import Optional

DEFAULT_PAD_TOKEN = "[PAD]"
TRUNCATION_SIDES = ("left", "right", None)


def prepare_tokenizer(tokenizer, *, pad_token: str = DEFAULT_PAD_TOKEN):
    """Checks and fixes a tokenizer for RLHF, in place; returns it.

    - It must have an EOS token (responses end with it; the EOS trick needs it): ValueError if not.
    - It gets a dedicated pad token when it has none or when its pad token is EOS ("The N
      Implementation Details of RLHF with PPO" #2; N+ adds [PAD]): a pad equal to EOS makes
      "truncate after the first EOS" and "ignore padding" the same thing, a classic silent bug.
      The new token enlarges the vocabulary: call
      ``rlhf_fast.models.resize_embeddings_for_tokenizer(model, tokenizer)`` on every model used
      with this tokenizer.
    - ``padding_side`` becomes "left" (generation continues from the right edge).
    """
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no EOS token (eos_token is None); set "
            "tokenizer.eos_token (responses must end with EOS) before building datasets"
        )
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if pad_token == tokenizer.eos_token:
            raise ValueError(f"pad_token {pad_token!r} must differ from the EOS token")
        tokenizer.add_special_tokens({"pad_token": pad_token})
    tokenizer.padding_side = "left"
    return tokenizer


def check_tokenizer(tokenizer) -> None:
    """ValueError unless the tokenizer has an EOS token and a pad token distinct from it."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token (eos_token is None)")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            "tokenizer needs a pad token distinct from EOS; call rlhf_fast.data.prepare_tokenizer(tokenizer)"
        )


def truncate(ids: list[int], max_length: Optional[int], side: Optional[str], *, what: str) -> list[int]:
    """``ids`` cut to ``max_length`` tokens: "left" keeps the end (where a prompt's
    "TL;DR:" / question lives), "right" keeps the start, None raises ValueError (``what`` names
    the record and field)."""
    if side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation must be one of {TRUNCATION_SIDES}, got {side!r}")
    if max_length is None or len(ids) <= max_length:
        return ids
    if side is None:
        raise ValueError(f"{what} has {len(ids)} tokens, more than the limit {max_length}, and truncation is off")
    return ids[-max_length:] if side == "left" else ids[:max_length]


def encode(tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
