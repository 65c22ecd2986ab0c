"""Loading Hugging Face causal LMs and backbones from a local directory or a config.

Nothing here downloads: every ``from_pretrained`` runs with ``local_files_only=True`` and a
source that is not an existing directory is a ValueError. Dropout is switched off on load, in the
config (so modules built later agree) and on every module ("The N Implementation Details of RLHF
with PPO" #13; N+ turns it off for SFT, RM and PPO): with dropout on, the PPO ratio is not 1 on
the first minibatch (TRL #454).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Union

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

Source = Union[str, os.PathLike, PretrainedConfig]

# Config attributes that hold a dropout probability in the architectures we know; any other
# attribute whose name contains "dropout" or ends in "pdrop" is zeroed as well.
_DROPOUT_SUFFIXES = ("pdrop", "dropout", "dropout_prob", "dropout_rate")


def _is_dropout_name(name: str) -> bool:
    name = name.lower()
    return "dropout" in name or name.endswith(_DROPOUT_SUFFIXES)


def disable_dropout_in_config(config: PretrainedConfig) -> PretrainedConfig:
    """Sets every float dropout probability in ``config`` to 0 (in place; returns it)."""
    for key, value in list(config.to_dict().items()):
        if _is_dropout_name(key) and isinstance(value, float) and not isinstance(value, bool):
            setattr(config, key, 0.0)
    for sub in ("text_config", "decoder"):  # composite configs
        inner = getattr(config, sub, None)
        if isinstance(inner, PretrainedConfig):
            disable_dropout_in_config(inner)
    return config


def disable_dropout(model: nn.Module) -> nn.Module:
    """Zeroes dropout everywhere in ``model``: ``nn.Dropout`` modules and the float attributes
    (``attention_dropout`` in Llama / Qwen2 / GPT-NeoX attention) that some modules read at call
    time instead of owning an ``nn.Dropout``. Returns the model."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_name(name) and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if isinstance(config, PretrainedConfig):
        disable_dropout_in_config(config)
    return model


def _local_dir(source: Union[str, os.PathLike]) -> Path:
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"model source {str(source)!r} is not a local directory; rlhf_fast never downloads "
            "weights: pass a directory written by save_pretrained, or a transformers config"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} has no config.json")
    return path


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Seeds the CPU RNG inside the block (random init from a config) and restores it after."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _load(auto_cls, source: Source, *, dtype, attn_implementation, disable_dropout_: bool, seed, trust_remote_code):
    if not isinstance(source, PretrainedConfig):
        from rlhf_fast.models import lora

        if lora.is_adapter_dir(source):  # a LoRA-trained model: base/ + adapter, merged (models/lora.py)
            def load_base(path, over):
                cls = AutoModelForCausalLM if over == "causal_lm" else AutoModel
                return _load(cls, path, dtype=dtype, attn_implementation=attn_implementation,
                             disable_dropout_=disable_dropout_, seed=seed, trust_remote_code=trust_remote_code)

            want = "causal_lm" if auto_cls is AutoModelForCausalLM else "backbone"
            return lora.load_merged(source, want=want, load_base=load_base)
    kwargs = {}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if isinstance(source, PretrainedConfig):
        config = source.__class__.from_dict(source.to_dict())  # never mutate the caller's config
        if disable_dropout_:
            disable_dropout_in_config(config)
        with _seeded(seed):
            model = auto_cls.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
        if dtype is not None:
            model = model.to(dtype)
    else:
        path = _local_dir(source)
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        if disable_dropout_:
            disable_dropout_in_config(config)
        if dtype is not None:
            kwargs["dtype"] = dtype
        with _seeded(seed):  # only weights missing from the checkpoint are drawn
            model = auto_cls.from_pretrained(
                path, config=config, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs
            )
    if disable_dropout_:
        disable_dropout(model)
    return model


def load_causal_lm(
    source: Source,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    disable_dropout: bool = True,
    seed: int | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Any Hugging Face causal LM (``AutoModelForCausalLM``) from a local directory or a config.

    ``source``: a directory written by ``save_pretrained`` or a ``PretrainedConfig`` (random init,
    drawn from ``seed`` when given, without touching the global RNG). ``dtype``: load dtype
    (default: the checkpoint's). Dropout is disabled unless ``disable_dropout=False``.
    """
    return _load(
        AutoModelForCausalLM, source, dtype=dtype, attn_implementation=attn_implementation,
        disable_dropout_=disable_dropout, seed=seed, trust_remote_code=trust_remote_code,
    )


def load_backbone(
    source: Source,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    disable_dropout: bool = True,
    seed: int | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The transformer body (``AutoModel``: no LM head) of a causal LM, from a local directory or a
    config. A causal-LM checkpoint loads fine: its LM head weights are simply not used. Used by
    the reward model and the critic, which put a scalar head on the final hidden state."""
    return _load(
        AutoModel, source, dtype=dtype, attn_implementation=attn_implementation,
        disable_dropout_=disable_dropout, seed=seed, trust_remote_code=trust_remote_code,
    )


def backbone_of(causal_lm: PreTrainedModel) -> PreTrainedModel:
    """The transformer body inside a causal LM (``GPT2LMHeadModel.transformer``,
    ``LlamaForCausalLM.model``, ``GPTNeoXForCausalLM.gpt_neox``, ...)."""
    base = getattr(causal_lm, "base_model", None)
    if base is None or base is causal_lm:
        raise ValueError(f"cannot find the backbone of {type(causal_lm).__name__} (no base_model)")
    return base


def hidden_size_of(config: PretrainedConfig) -> int:
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    text = getattr(config, "text_config", None)
    if isinstance(text, PretrainedConfig):
        return hidden_size_of(text)
    raise ValueError(f"cannot read the hidden size from {type(config).__name__}")


def resize_embeddings_for_tokenizer(model: PreTrainedModel, tokenizer, *, pad_to_multiple_of: int | None = None) -> bool:
    """Grows ``model``'s input (and tied / untied output) embeddings to ``len(tokenizer)`` when the
    tokenizer has more tokens than the model, e.g. after ``rlhf_fast.data.prepare_tokenizer``
    added a dedicated pad token. Also records the pad / eos ids in the model's config. Returns
    True if the embeddings were resized. Call it before wrapping the model (Policy, RewardModel)
    and before building optimizers."""
    needed = len(tokenizer)
    current = model.get_input_embeddings().weight.shape[0]
    resized = False
    if needed > current:
        model.resize_token_embeddings(needed, pad_to_multiple_of=pad_to_multiple_of)
        resized = True
    if getattr(tokenizer, "pad_token_id", None) is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.pad_token_id = tokenizer.pad_token_id
    return resized
