"""Prompt, SFT and preference datasets (JSONL files, local HF ``datasets`` directories, lists of
dicts) with configurable field names, text or chat ``messages`` (``rlhf_fast.data.chat``);
tokenisation with query truncation; left padding with a pad token distinct from EOS; collators
that also return ``position_ids = cumsum(mask) - mask``.

A tokenizer that lacks a pad token (or uses EOS as pad) gets a new "[PAD]" token from
``prepare_tokenizer`` (the datasets call it): resize every model used with it through
``rlhf_fast.models.resize_embeddings_for_tokenizer(model, tokenizer)``.
"""

from rlhf_fast.data.chat import check_records, parts_of
from rlhf_fast.data.collate import (
    IGNORE_INDEX,
    PreferenceCollator,
    PromptCollator,
    SFTCollator,
    left_pad,
    position_ids_from_mask,
)
from rlhf_fast.data.datasets import PreferenceDataset, PromptDataset, SFTDataset
from rlhf_fast.data.records import Record, load_records, write_jsonl
from rlhf_fast.data.tokenize import DEFAULT_PAD_TOKEN, check_tokenizer, prepare_tokenizer, truncate

__all__ = [
    "DEFAULT_PAD_TOKEN", "IGNORE_INDEX", "PreferenceCollator", "PreferenceDataset", "PromptCollator",
    "PromptDataset", "Record", "SFTCollator", "SFTDataset", "check_records", "check_tokenizer", "left_pad", "load_records",
    "parts_of", "position_ids_from_mask", "prepare_tokenizer", "truncate", "write_jsonl",
]
