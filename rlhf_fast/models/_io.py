"""Saving and loading the wrappers: Hugging Face files plus two small files beside them.

Layout of a saved directory::

    config.json, model.safetensors, ...   the HF model (causal LM for a policy, backbone for a
                                          reward model / critic), loadable by transformers alone
    rlhf_fast_heads.safetensors           head weights and normalisation tensors, named as in the
                                          wrapper's state_dict ("value_head.linear.weight", ...)
    rlhf_fast.json                        {"format_version", "kind", ...metadata}
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HEADS_FILE = "rlhf_fast_heads.safetensors"
META_FILE = "rlhf_fast.json"
FORMAT_VERSION = 1


def save_extras(directory, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tensors:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / HEADS_FILE))
    elif (directory / HEADS_FILE).exists():
        (directory / HEADS_FILE).unlink()
    meta = {"format_version": FORMAT_VERSION, **meta}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_extras(directory) -> tuple[dict[str, torch.Tensor], dict]:
    """Head tensors and metadata saved beside a model; ({}, {}) for a plain HF directory."""
    directory = Path(directory)
    meta: dict = {}
    if (directory / META_FILE).is_file():
        try:
            meta = json.loads((directory / META_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{directory / META_FILE}: not valid JSON ({e})") from None
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{directory / META_FILE}: format_version {version!r} is not {FORMAT_VERSION}")
    tensors = load_file(str(directory / HEADS_FILE)) if (directory / HEADS_FILE).is_file() else {}
    return tensors, meta


def take_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
