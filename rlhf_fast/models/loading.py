"""Loading Hugging Face causal LMs and backbones from a local directory or a config.

Nothing here downloads: every ``from_pretrained`` runs with ``local_files_only=True`` and a
source that is not an existing directory is a ValueError. Nothing is drawn silently either: a
checkpoint that lacks weights the requested class needs (transformers would initialise them at
random and print a load report) is a ValueError naming the weights and the directory's
architecture, and a sequence-classification directory is never loaded as a causal LM. Dropout is switched off on load, in the
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

from rlhf_fast.models import lora

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


def architectures_of(path) -> list[str]:
    """The ``architectures`` field of ``path/config.json`` (what ``save_pretrained`` recorded,
    e.g. ``["Qwen2ForSequenceClassification"]``); [] when it has none."""
    import json

    config = Path(path) / ("base/config.json" if lora.is_adapter_dir(path) else "config.json")  # LoRA: base/ + adapter
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError) as e:
        raise ValueError(f"{Path(path) / 'config.json'} cannot be read ({e})") from None
    return [a for a in archs if isinstance(a, str)]


def is_sequence_classifier(path) -> bool:
    """Whether ``path`` was saved from an ``AutoModelForSequenceClassification`` model."""
    return any(a.endswith("ForSequenceClassification") for a in architectures_of(path))


def _local_dir(source: Union[str, os.PathLike]) -> Path:
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"model source {str(source)!r} is not a local directory; rlhf_fast never downloads "
            "weights: pass a directory written by save_pretrained, or a transformers config"
        )
    if not (path / "config.json").is_file() and not lora.is_adapter_dir(path):
        raise ValueError(f"model directory {str(path)!r} has no config.json (nor a LoRA adapter with its base/)")
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
        with _seeded(seed):
            model = from_pretrained_strict(auto_cls, path, config=config, trust_remote_code=trust_remote_code, **kwargs)
    if disable_dropout_:
        disable_dropout(model)
    return model


def from_pretrained_strict(auto_cls, path: Path, **kwargs) -> PreTrainedModel:
    """``auto_cls.from_pretrained(path, local_files_only=True, **kwargs)`` that refuses to draw
    weights (``_check_loading_info``) and turns a missing or unreadable weights file (transformers'
    OSError) or weights of another shape than the config says (its RuntimeError) into a ValueError
    naming the directory."""
    try:
        model, info = auto_cls.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
    except OSError as e:
        raise ValueError(f"{path}: cannot load the weights ({e})") from None
    except RuntimeError as e:  # transformers raises this for weights whose shape differs from the config's
        if "size mismatch" not in str(e) and "mismatched_sizes" not in str(e):
            raise
        found = ", ".join(architectures_of(path)) or "no architectures field"
        raise ValueError(f"{path}: its weights do not fit its config.json ({found}): "
                         f"{' '.join(str(e).split())[:400]}") from None
    _check_loading_info(path, type(model).__name__, info)
    return model


def _check_loading_info(path: Path, cls_name: str, info: dict) -> None:
    """Refuses a load that left weights at their random init (``missing_keys``): transformers
    only prints a report and goes on. Unexpected keys are fine (a backbone loaded from a causal-LM
    or sequence-classification directory leaves the head's weights unused)."""
    missing = sorted(info.get("missing_keys") or ())
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or ()))
    if missing or mismatched:
        found = ", ".join(architectures_of(path)) or "no architectures field"
        shown = ", ".join(missing[:6]) + (f" (and {len(missing) - 6} more)" if len(missing) > 6 else "")
        what = f"missing weights {shown}" if missing else f"weights of another shape {', '.join(mismatched[:6])}"
        raise ValueError(f"{path}: loading it as {cls_name} leaves {what}, which would be drawn at random; the "
                         f"directory holds {found}")


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
    (default: the checkpoint's). Dropout is disabled unless ``disable_dropout=False``. A
    directory saved from a sequence-classification model (a reward model) or one that lacks the
    LM head's weights is a ValueError.
    """
    if not isinstance(source, PretrainedConfig):
        path = _local_dir(source)
        if is_sequence_classifier(path):
            raise ValueError(f"{path} holds a sequence-classification model ({', '.join(architectures_of(path))}), "
                             "not a causal LM: a reward model cannot be loaded as a policy")
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


def _added_special_ids(tokenizer) -> set[int]:
    """Ids of the special tokens added on top of the tokenizer's base vocabulary ("[PAD]" from
    ``rlhf_fast.data.prepare_tokenizer``, chat markers, ...)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}


def embedding_rows(model: PreTrainedModel) -> int:
    """Rows of the input embedding: the ids a model can read (may exceed ``len(tokenizer)``:
    Qwen2 pads its embedding to a multiple of 128)."""
    return int(model.get_input_embeddings().weight.shape[0])


def check_vocab_fits(model: PreTrainedModel, tokenizer, *, what: str, never_read: tuple[int, ...] = ()) -> None:
    """ValueError, naming both sizes, when ``tokenizer`` makes ids that ``model``'s embedding has
    no row for; ids in ``never_read`` (the pad token, which a reward model only meets at masked
    positions) are exempt."""
    rows, size = embedding_rows(model), len(tokenizer)
    beyond = [i for i in range(rows, size) if i not in never_read]
    if beyond:
        raise ValueError(
            f"{what}: the tokenizer has {size} tokens but the model's embedding has {rows} rows "
            f"(ids {beyond[0]}..{beyond[-1]} have none): the tokenizer does not belong to this model; give the "
            "tokenizer it was trained with (model.tokenizer_path)"
        )


def tokenizer_disagreement(own, tokenizer) -> list[str]:
    """Tokens of tokenizer ``own`` (a model's saved tokenizer) that ``tokenizer`` maps to another id
    (or not at all), sorted by ``own``'s id. Pad tokens are exempt (``own``'s pad, and whatever
    ``own`` has at ``tokenizer``'s pad id): padding is masked, never read."""
    mine, theirs = own.get_vocab(), tokenizer.get_vocab()
    exempt = {getattr(own, "pad_token", None)}
    pad_id = getattr(tokenizer, "pad_token_id", None)
    return sorted((t for t, i in mine.items() if theirs.get(t) != i and t not in exempt and i != pad_id),
                  key=lambda t: mine[t])


def resize_embeddings_for_tokenizer(model: PreTrainedModel, tokenizer, *, pad_to_multiple_of: int | None = None,
                                    what: str = "model") -> bool:
    """Grows ``model``'s input (and tied / untied output) embeddings to ``len(tokenizer)`` when the
    tokenizer has more tokens than the model, e.g. after ``rlhf_fast.data.prepare_tokenizer``
    added a dedicated pad token. Only added special tokens may need new rows: a tokenizer whose
    ordinary vocabulary exceeds the embedding belongs to another model, and growing the embedding
    to fit it would train on wrong ids, so that is a ValueError naming both sizes (``what`` names
    the model). Also records the pad / eos ids in the model's config. Returns True if the
    embeddings were resized. Call it before wrapping the model (Policy, RewardModel) and before
    building optimizers."""
    needed = len(tokenizer)
    current = embedding_rows(model)
    resized = False
    if needed > current:
        check_vocab_fits(model, tokenizer, what=what, never_read=tuple(_added_special_ids(tokenizer)))
        model.resize_token_embeddings(needed, pad_to_multiple_of=pad_to_multiple_of)
        resized = True
    if getattr(tokenizer, "pad_token_id", None) is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.pad_token_id = tokenizer.pad_token_id
    return resized
