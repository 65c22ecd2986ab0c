"""Prompt, SFT and preference datasets over JSONL files, local HF ``datasets`` directories or
lists of dicts, with text fields or chat ``messages`` (``rlhf_fast.data.chat``: rendered with the
tokenizer's chat template). Tokenisation happens once, up front, so a bad record fails at
construction with its file and line, not in the middle of training."""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils.data import Dataset

from rlhf_fast.data.chat import Parts, parts_of, render_prompt, render_response
from rlhf_fast.data.collate import IGNORE_INDEX, PreferenceCollator, PromptCollator, SFTCollator
from rlhf_fast.data.records import Record, RecordSource, load_records
from rlhf_fast.data.tokenize import check_tokenizer, encode, prepare_tokenizer, truncate


class _Base(Dataset):
    kind = ""  # what parts_of reads from a record: "prompt", "sft" or "preference"

    def __init__(self, source: RecordSource, tokenizer, *, split: Optional[str], prepare: bool, fields: dict):
        self.fields = fields  # the record field names, as parts_of takes them
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

    def _parts(self, rec: Record) -> Parts:
        return parts_of(rec, self.kind, **self.fields)

    def _prompt(self, rec: Record, parts: Parts) -> tuple[str, list[int]]:
        """(prompt text, its token ids before truncation). A chat prompt is rendered by the
        template, which carries its own special tokens (none are added)."""
        if parts.chat:
            text, templated = render_prompt(self.tokenizer, parts.prompt, origin=rec.origin)
        else:
            text, templated = parts.prompt, False
        return text, encode(self.tokenizer, text, add_special_tokens=self.add_special_tokens and not templated)

    def _truncate_prompt(self, rec: Record, ids: list[int]) -> list[int]:
        return truncate(ids, self.max_prompt_length, self.truncation, what=f"{rec.origin}: field {self.prompt_field!r}")

    def _response_ids(self, rec: Record, parts: Parts, i: int, field: str) -> list[int]:
        response = parts.responses[i]
        has_eos = False
        if parts.chat:
            text = render_response(self.tokenizer, parts.prompt, response, origin=f"{rec.origin}: field {field!r}")
            eos = self.tokenizer.eos_token
            if eos and text.rstrip().endswith(eos):  # the template closes the turn with EOS: keep exactly one
                text, has_eos = text.rstrip()[: -len(eos)], True
        else:
            text = response
        ids = encode(self.tokenizer, text, add_special_tokens=False)
        if self.append_eos or has_eos:
            ids = ids + [self.tokenizer.eos_token_id]
        # Responses are cut on the right; a response cut short loses its EOS (it did not end).
        return truncate(ids, self.max_response_length, "right", what=f"{rec.origin}: field {field!r}")


class PromptDataset(_Base):
    """Prompts (queries) for rollouts.

    Items: ``{"input_ids": (n,) int64, "index": int}``; ``prompts[i]`` keeps the text (a chat
    prompt's rendering). A record gives its prompt as a string in ``prompt_field``, or as a message
    list there or in ``messages_field`` (rendered with the chat template and its generation prompt;
    ``rlhf_fast.data.chat``). ``max_prompt_length`` with ``truncation`` "left" (keep the end,
    default), "right" (keep the start) or None (a longer prompt is a ValueError naming file, line
    and field). Text prompts are encoded with ``add_special_tokens`` (so a tokenizer's BOS is
    kept); templated ones carry their own. ``prepare_tokenizer`` runs on the tokenizer unless
    ``prepare=False`` (it may add a pad token: resize the model's embeddings with
    ``rlhf_fast.models.resize_embeddings_for_tokenizer``).
    """

    kind = "prompt"

    def __init__(
        self,
        source: RecordSource,
        tokenizer,
        *,
        prompt_field: str = "prompt",
        messages_field: str = "messages",
        max_prompt_length: Optional[int] = None,
        truncation: Optional[str] = "left",
        add_special_tokens: bool = True,
        split: Optional[str] = None,
        prepare: bool = True,
    ):
        super().__init__(source, tokenizer, split=split, prepare=prepare,
                         fields=dict(prompt_field=prompt_field, messages_field=messages_field))
        self.prompt_field, self.max_prompt_length, self.truncation = prompt_field, max_prompt_length, truncation
        self.add_special_tokens = add_special_tokens
        self.prompts, self.input_ids = [], []
        for r in self.records:
            text, ids = self._prompt(r, self._parts(r))
            self.prompts.append(text)
            self.input_ids.append(torch.tensor(self._truncate_prompt(r, ids), dtype=torch.long))

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "index": i}

    def collator(self, *, pad_to_length: Optional[int] = None, pad_to_multiple_of: Optional[int] = None) -> PromptCollator:
        """Left-padding collator; ``pad_to_length`` gives every batch the same query length."""
        return PromptCollator(self.tokenizer.pad_token_id, pad_to_length, pad_to_multiple_of)


class SFTDataset(_Base):
    """Prompt + response pairs for supervised fine-tuning.

    A record holds ``prompt_field`` + ``response_field`` strings, or chat messages: the whole
    conversation in ``messages_field`` (the last message, an assistant turn, is the response), or
    prompt and response as message lists (TRL's prompt-completion format); conversations are
    rendered with the tokenizer's chat template (``rlhf_fast.data.chat``).

    Items: ``{"input_ids", "labels"}`` (n,) int64: prompt tokens, then the response tokens and
    EOS (``append_eos``; N+: completions get an appended EOS; a template that closes the turn with
    EOS keeps exactly that one). ``labels`` are the input ids on the response and ``IGNORE_INDEX``
    on the prompt, unless ``train_on_prompt`` (N+ SFT trains on query + summary). Text responses
    are not given a leading space: store them with one if the tokenizer needs it (N+: " " + summary).
    """

    kind = "sft"

    def __init__(
        self,
        source: RecordSource,
        tokenizer,
        *,
        prompt_field: str = "prompt",
        response_field: str = "response",
        messages_field: str = "messages",
        max_prompt_length: Optional[int] = None,
        max_response_length: Optional[int] = None,
        truncation: Optional[str] = "left",
        append_eos: bool = True,
        train_on_prompt: bool = False,
        add_special_tokens: bool = True,
        split: Optional[str] = None,
        prepare: bool = True,
    ):
        super().__init__(source, tokenizer, split=split, prepare=prepare,
                         fields=dict(prompt_field=prompt_field, response_field=response_field,
                                     messages_field=messages_field))
        self.prompt_field, self.response_field = prompt_field, response_field
        self.max_prompt_length, self.max_response_length, self.truncation = max_prompt_length, max_response_length, truncation
        self.append_eos, self.add_special_tokens = append_eos, add_special_tokens
        self.items = []
        for r in self.records:
            parts = self._parts(r)
            p = self._truncate_prompt(r, self._prompt(r, parts)[1])
            c = self._response_ids(r, parts, 0, response_field)
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

    A record holds three strings, or chosen and rejected as message lists (TRL's preference
    format) with the prompt as a message list or implicit (the messages both share before their
    last, assistant, turn); rendered with the chat template (``rlhf_fast.data.chat``).

    Items: ``{"chosen_input_ids", "rejected_input_ids"}`` (prompt + response + EOS) and
    ``prompt_length``. The reward is read at the last valid token, i.e. the EOS (N+).
    ``prompt_ids[i]``: record i's prompt tokens before truncation (what the reward model's
    normalisation samples from).
    """

    kind = "preference"

    def __init__(
        self,
        source: RecordSource,
        tokenizer,
        *,
        prompt_field: str = "prompt",
        chosen_field: str = "chosen",
        rejected_field: str = "rejected",
        messages_field: str = "messages",
        max_prompt_length: Optional[int] = None,
        max_response_length: Optional[int] = None,
        truncation: Optional[str] = "left",
        append_eos: bool = True,
        add_special_tokens: bool = True,
        split: Optional[str] = None,
        prepare: bool = True,
    ):
        super().__init__(source, tokenizer, split=split, prepare=prepare,
                         fields=dict(prompt_field=prompt_field, chosen_field=chosen_field,
                                     rejected_field=rejected_field, messages_field=messages_field))
        self.prompt_field, self.chosen_field, self.rejected_field = prompt_field, chosen_field, rejected_field
        self.max_prompt_length, self.max_response_length, self.truncation = max_prompt_length, max_response_length, truncation
        self.append_eos, self.add_special_tokens = append_eos, add_special_tokens
        self.items, self.prompt_ids = [], []
        for r in self.records:
            parts = self._parts(r)
            full = self._prompt(r, parts)[1]
            self.prompt_ids.append(full)
            p = self._truncate_prompt(r, full)
            ch, rj = self._response_ids(r, parts, 0, chosen_field), self._response_ids(r, parts, 1, rejected_field)
            self.items.append({
                "chosen_input_ids": torch.tensor(p + ch, dtype=torch.long),
                "rejected_input_ids": torch.tensor(p + rj, dtype=torch.long),
                "prompt_length": len(p),
            })

    def __getitem__(self, i: int) -> dict:
        return self.items[i]

    def collator(self, *, pad_to_multiple_of: Optional[int] = None) -> PreferenceCollator:
        return PreferenceCollator(self.tokenizer.pad_token_id, pad_to_multiple_of)
