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


KINDS = ("policy", "reward_model", "critic")


def load_extras(directory) -> tuple[dict[str, torch.Tensor], dict]:
    """Head tensors and metadata saved beside a model; ({}, {}) for a plain HF directory. A heads
    file without the metadata that says what it holds, or metadata without a known ``kind``, is a
    ValueError (it would otherwise be read as a plain model and its heads ignored)."""
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
        if meta.get("kind") not in KINDS:
            raise ValueError(f"{directory / META_FILE}: kind {meta.get('kind')!r} is not one of {KINDS}")
    elif (directory / HEADS_FILE).is_file():
        raise ValueError(f"{directory}: {HEADS_FILE} without {META_FILE}, which says what the heads are; the "
                         "directory is incomplete (save it again with save_pretrained)")
    tensors = load_file(str(directory / HEADS_FILE)) if (directory / HEADS_FILE).is_file() else {}
    return tensors, meta


def head_tensors(tensors: dict[str, torch.Tensor], prefix: str, directory, what: str) -> dict[str, torch.Tensor]:
    """The ``prefix`` tensors of a saved ScalarHead (``linear.weight``, ``linear.bias``); a
    ValueError naming ``directory`` and ``what`` when they are not all there."""
    head = take_prefix(tensors, prefix)
    if set(head) != {"linear.weight", "linear.bias"}:
        state = f"has {sorted(head)}" if head else ("is missing" if not tensors else "lacks them")
        raise ValueError(f"{directory}: {META_FILE} says it holds a {what}, but {HEADS_FILE} {state} "
                         f"({prefix}linear.weight / .bias)")
    return head


def take_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
