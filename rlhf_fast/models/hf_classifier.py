"""Hugging Face ``AutoModelForSequenceClassification`` directories as reward models: what they hold
(backbone, the trained per-token ``score`` layer, the pad id transformers reads the score before),
and what a model directory holds, for errors. ``RewardModel.from_pretrained`` and
``Critic.from_pretrained`` build on these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from rlhf_fast.models import _io
from rlhf_fast.models.backbone import hidden_size_of
from rlhf_fast.models.loading import (
    _local_dir,
    architectures_of,
    disable_dropout,
    disable_dropout_in_config,
    from_pretrained_strict,
    is_sequence_classifier,
)


@dataclass
class HFRewardParts:
    """What an ``AutoModelForSequenceClassification`` directory holds for a reward model.

    backbone: the transformer body (``model.<base_model_prefix>``).
    head: ``{"linear.weight": (1, H), "linear.bias": (1,)}`` float32 from the trained score layer
        (a zero bias where the layer has none, as transformers' decoder classifiers).
    pad_token_id: the config's pad id: transformers reads the score at the last token that is not
        this id (``GenericForSequenceClassification.forward`` in transformers'
        ``modeling_layers.py``), so a sequence ending in it (pad == EOS) is read before it.
    """

    backbone: PreTrainedModel
    head: dict
    pad_token_id: Optional[int]


def _score_layer(model: PreTrainedModel) -> nn.Linear:
    """The per-token ``score`` layer of a decoder sequence classifier (transformers'
    ``GenericForSequenceClassification`` and GPT-2 / GPT-NeoX / ... classifiers: score every
    position, pool at the last non-pad token). Encoder classifiers (BERT's ``classifier`` on a
    pooled first token) score elsewhere, so reading their head per token would be wrong: refused."""
    score = getattr(model, "score", None)
    if not isinstance(score, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no per-token `score` layer: it is not a decoder sequence "
                         "classifier read at the last token (an encoder's classifier reads a pooled token), so its "
                         "scores cannot be reproduced; use a decoder reward model (Llama, Qwen2, GPT-2, ...)")
    return score


def load_hf_reward_parts(source, *, dtype=None, attn_implementation=None, trust_remote_code: bool = False) -> HFRewardParts:
    """Backbone, trained score head and pad id of an ``AutoModelForSequenceClassification``
    directory (any decoder architecture transformers maps). ValueError when the directory is not a
    sequence classifier, has ``num_labels != 1``, lacks the score weights (nothing is drawn), or
    is an encoder classifier (its score is not read at the last token)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = _local_dir(source)
    found = ", ".join(architectures_of(path)) or "no architectures field"
    if not is_sequence_classifier(path):
        raise ValueError(f"{path} is not a sequence-classification model (it holds {found})")
    config = disable_dropout_in_config(AutoConfig.from_pretrained(path, local_files_only=True,
                                                                  trust_remote_code=trust_remote_code))
    if config.num_labels != 1:
        raise ValueError(f"{path}: {found} with num_labels = {config.num_labels}; a reward model scores with one "
                         "label (num_labels = 1)")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = from_pretrained_strict(AutoModelForSequenceClassification, path, config=config,
                                   trust_remote_code=trust_remote_code, **kwargs)
    disable_dropout(model)
    layer = _score_layer(model)
    if tuple(layer.weight.shape) != (1, hidden_size_of(config)):
        raise ValueError(f"{path}: score layer of shape {tuple(layer.weight.shape)}, expected (1, {hidden_size_of(config)})")
    bias = layer.bias if layer.bias is not None else torch.zeros(1)
    head = {"linear.weight": layer.weight.detach().float().clone(), "linear.bias": bias.detach().float().clone()}
    backbone = getattr(model, model.base_model_prefix)
    pad = getattr(config.get_text_config(), "pad_token_id", None)
    return HFRewardParts(backbone=backbone, head=head, pad_token_id=int(pad) if pad is not None else None)


def holds_reward_model(path) -> bool:
    """Whether a model directory holds a reward model (rlhf_fast's or an HF sequence classifier)."""
    if not (Path(path) / "config.json").is_file():
        return False
    return is_sequence_classifier(path) or _io.load_extras(path)[1].get("kind") == "reward_model"


def describe_model_dir(path) -> str:
    """What a model directory holds, for errors: "Qwen2ForCausalLM (saved by rlhf_fast as a policy)"."""
    try:
        found = ", ".join(architectures_of(path)) or "a config without an architectures field"
    except ValueError as e:
        return str(e)
    try:
        kind = _io.load_extras(path)[1].get("kind")
    except ValueError:
        kind = None
    return found + (f" (saved by rlhf_fast as a {kind})" if kind else "")
