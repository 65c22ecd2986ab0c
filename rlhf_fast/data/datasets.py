"""Prompt, SFT and preference datasets over JSONL files, local HF ``datasets`` directories or
lists of dicts. Tokenisation happens once, up front, so a bad record fails at construction with
its file and line, not in the middle of training."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils.data import Dataset

from rlhf_fast.data.collate import IGNORE_INDEX, PreferenceCollator, PromptCollator, SFTCollator
from rlhf_fast.data.records import Record, RecordSource, load_records
from rlhf_fast.data.tokenize import check_tokenizer, encode, prepare_tokenizer, truncate


class _Base(Dataset):
    def __init__(self, source: RecordSource, tokenizer, *, split: Optional[str], prepare: bool):
        if prepare:
            prepare_tokenizer(tokenizer)
        else:  # still refuse a tokenizer without EOS or without a distinct pad
            check_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.records: list[Record] = load_records(source, split=split)
        if not self.records:
            name = str(source) if isinstance(source, (str, os.PathLike)) else f"({type(source).__name__})"
            raise ValueError(f"data source {name} is empty")

    def __len__(self) -> int:
        return len(self.records)

    def _prompt_ids(self, rec: Record) -> list[int]:
        text = rec.text(self.prompt_field)
        ids = encode(self.tokenizer, text, add_special_tokens=self.add_special_tokens)
        return truncate(ids, self.max_prompt_length, self.truncation, what=f"{rec.origin}: field {self.prompt_field!r}")

    def _response_ids(self, rec: Record, field: str) -> list[int]:
        ids = encode(self.tokenizer, rec.text(field), add_special_tokens=False)
        if self.append_eos:
            ids = ids + [self.tokenizer.eos_token_id]
        # Responses are cut on the right; a response cut short loses its EOS (it did not end).
        return truncate(ids, self.max_response_length, "right", what=f"{rec.origin}: field {field!r}")


class PromptDataset(_Base):
    """Prompts (queries) for rollouts.

    Items: ``{"input_ids": (n,) int64, "index": int}``; ``prompts[i]`` keeps the text.
    ``max_prompt_length`` with ``truncation`` "left" (keep the end, default), "right" (keep the
    start) or None (a longer prompt is a ValueError naming file, line and field). Prompts are
    encoded with ``add_special_tokens`` (so a tokenizer's BOS is kept). ``prepare_tokenizer``
    runs on the tokenizer unless ``prepare=False`` (it may add a pad token: resize the model's
    embeddings with ``rlhf_fast.models.resize_embeddings_for_tokenizer``).
    """

    def __init__(
        self,
        source: RecordSource,
        tokenizer,
        *,
        prompt_field: str = "prompt",
        max_prompt_length: Optional[int] = None,
        truncation: Optional[str] = "left",
        add_special_tokens: bool = True,
        split: Optional[str] = None,
        prepare: bool = True,
    ):
        super().__init__(source, tokenizer, split=split, prepare=prepare)
        self.prompt_field, self.max_prompt_length, self.truncation = prompt_field, max_prompt_length, truncation
        self.add_special_tokens = add_special_tokens
        self.prompts = [r.text(prompt_field) for r in self.records]
        self.input_ids = [torch.tensor(self._prompt_ids(r), dtype=torch.long) for r in self.records]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "index": i}

    def collator(self, *, pad_to_length: Optional[int] = None, pad_to_multiple_of: Optional[int] = None) -> PromptCollator:
        """Left-padding collator; ``pad_to_length`` gives every batch the same query length."""
        return PromptCollator(self.tokenizer.pad_token_id, pad_to_length, pad_to_multiple_of)


class SFTDataset(_Base):
    """Prompt + response pairs for supervised fine-tuning.

    Items: ``{"input_ids", "labels"}`` (n,) int64: prompt tokens, then the response tokens and
    EOS (``append_eos``; N+: completions get an appended EOS). ``labels`` are the input ids on the
    response and ``IGNORE_INDEX`` on the prompt, unless ``train_on_prompt`` (N+ SFT trains on
    query + summary). Responses are not given a leading space: store them with one if the
    tokenizer needs it (N+: " " + summary).
    """

    def __init__(
        self,
        source: RecordSource,
        tokenizer,
        *,
        prompt_field: str = "prompt",
        response_field: str = "response",
        max_prompt_length: Optional[int] = None,
        max_response_length: Optional[int] = None,
        truncation: Optional[str] = "left",
        append_eos: bool = True,
        train_on_prompt: bool = False,
        add_special_tokens: bool = True,
        split: Optional[str] = None,
        prepare: bool = True,
    ):
        super().__init__(source, tokenizer, split=split, prepare=prepare)
        self.prompt_field, self.response_field = prompt_field, response_field
        self.max_prompt_length, self.max_response_length, self.truncation = max_prompt_length, max_response_length, truncation
        self.append_eos, self.add_special_tokens = append_eos, add_special_tokens
        self.items = []
        for r in self.records:
            p, c = self._prompt_ids(r), self._response_ids(r, response_field)
            labels = (p if train_on_prompt else [IGNORE_INDEX] * len(p)) + c
            self.items.append({
                "input_ids": torch.tensor(p + c, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
            })

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def collator(self, *, pad_to_multiple_of: Optional[int] = None) -> SFTCollator:
        return SFTCollator(self.tokenizer.pad_token_id, pad_to_multiple_of)


class PreferenceDataset(_Base):
    """Comparisons for reward-model training: a prompt, a chosen and a rejected response.

    Items: ``{"chosen_input_ids", "rejected_input_ids"}`` (prompt + response + EOS) and
    ``prompt_length``. The reward is read at the last valid token, i.e. the EOS (N+).
    """

    def __init__(
        self,
        source: RecordSource,
        tokenizer,
        *,
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        max_prompt_length: Optional[int] = None,
        max_response_length: Optional[int] = None,
        truncation: Optional[str] = "left",
        append_eos: bool = True,
        add_special_tokens: bool = True,
        split: Optional[str] = None,
        prepare: bool = True,
    ):
        super().__init__(source, tokenizer, split=split, prepare=prepare)
        self.prompt_field, self.chosen_field, self.rejected_field = prompt_field, chosen_field, rejected_field
        self.max_prompt_length, self.max_response_length, self.truncation = max_prompt_length, max_response_length, truncation
        self.append_eos, self.add_special_tokens = append_eos, add_special_tokens
        self.items = []
        for r in self.records:
            p = self._prompt_ids(r)
            ch, rj = self._response_ids(r, chosen_field), self._response_ids(r, rejected_field)
            self.items.append({
                "chosen_input_ids": torch.tensor(p + ch, dtype=torch.long),
                "rejected_input_ids": torch.tensor(p + rj, dtype=torch.long),
                "prompt_length": len(p),
            })

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def collator(self, *, pad_to_multiple_of: Optional[int] = None) -> PreferenceCollator:
        return PreferenceCollator(self.tokenizer.pad_token_id, pad_to_multiple_of)
