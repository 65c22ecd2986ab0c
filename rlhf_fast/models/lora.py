"""LoRA adapters through ``peft`` on the wrappers' Hugging Face models (docs/architecture.md "LoRA").

``add_lora(module, cfg, field=...)`` injects adapters into a HF model or backbone *in place*
(``peft.get_peft_model``: the base weights are frozen, each target ``Linear`` / ``Conv1D`` becomes a
peft ``lora.Linear`` whose ``B`` starts at zero, so the adapted model computes exactly the base
model's outputs until the first update). The module stays what it was (a ``GPT2LMHeadModel``, a
backbone), so ``Policy`` / ``RewardModel`` / ``Critic`` / the hybrid engine run it unchanged: the
engine generates through the adapted layers, nothing is merged or copied. The ``PeftModel`` is
kept beside the module (``lora_handle``), unregistered, so no weight is counted twice.

``adapters_disabled(module)`` is peft's ``disable_adapter()``: inside it the module computes the
base model. PPO's reference policy is ``AdaptersOff(policy)``: the policy itself with its adapters
off, no second copy of the weights.

A saved LoRA model directory (``save_model``)::

    adapter_config.json, adapter_model.safetensors   the adapter, peft format (PeftModel.from_pretrained)
    base/                                            the base weights the adapter applies to, HF format
    rlhf_fast.json, rlhf_fast_heads.safetensors      the wrapper's heads and metadata ("lora": {...})
    merged/                                          with ``save_merged``: base + adapter merged, HF format

``load_merged`` (called by ``models.loading`` for such a directory) loads base/ and the adapter and
merges them (peft ``merge_and_unload``): a LoRA-trained SFT model feeds the reward model and PPO
stages as a plain model, and a new adapter trains on top of it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from rlhf_fast.models import _io
from rlhf_fast.models.backbone import backbone_of

ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR = "base"
MERGED_DIR = "merged"

#: ``config.model_type`` -> the linear modules that get adapters by default (every linear layer of
#: the blocks; the LM head and the embeddings stay frozen). Other architectures: peft's "all-linear".
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    **{t: ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "mixtral")},
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


class LoraHandle:
    """What ``add_lora`` keeps beside an adapted module: the ``PeftModel`` and what it wraps
    ("causal_lm" or "backbone": the class a loader must rebuild the base as)."""

    def __init__(self, peft_model, over: str):
        self.peft_model, self.over = peft_model, over


def _linear_names(module: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    out_emb = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in module.named_modules()
             if isinstance(m, (nn.Linear, Conv1D)) and m is not out_emb}
    return sorted(names)


def target_modules_for(module: nn.Module, target_modules, *, field: str):
    """The validated target list for ``module``: ``target_modules`` when given (each name must be
    a linear module of the model, else a ValueError naming ``field`` and the modules it has), else
    the architecture's default."""
    have = _linear_names(module)
    if target_modules:
        missing = [t for t in target_modules if t not in have]
        if missing:
            raise ValueError(f"{field}: {type(module).__name__} has no linear module named {', '.join(missing)}; "
                             f"its linear modules are {', '.join(have)}")
        return list(target_modules)
    default = DEFAULT_TARGET_MODULES.get(getattr(module.config, "model_type", None))
    if default is None:
        return "all-linear"  # peft: every Linear / Conv1D except the output layer
    return [t for t in default if t in have]


def add_lora(module: nn.Module, cfg, *, field: str) -> nn.Module:
    """Injects LoRA adapters of ``cfg`` (a ``config.LoRAConfig`` with rank > 0) into ``module`` (a
    HF causal LM or backbone) in place and returns it; only the adapters require grad afterwards.
    ``field`` (e.g. "ppo.lora") names the config section in errors."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    if cfg.rank <= 0:
        raise ValueError(f"{field}.rank must be > 0 to add adapters, got {cfg.rank}")
    if lora_handle(module) is not None:
        raise ValueError(f"{field}: the model already has LoRA adapters")
    targets = target_modules_for(module, cfg.target_modules, field=f"{field}.target_modules")
    have = sorted({name.rsplit(".", 1)[-1] for name, _ in module.named_modules() if name})
    missing = [m for m in cfg.modules_to_save if m not in have]
    if missing:
        raise ValueError(f"{field}.modules_to_save: {type(module).__name__} has no module named {', '.join(missing)}; "
                         f"its modules are {', '.join(have)}")
    # GPT-2's Conv1D stores its weight transposed (in, out): peft needs fan_in_fan_out for it
    conv1d = any(isinstance(m, Conv1D) for m in module.modules())
    peft_cfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          fan_in_fan_out=conv1d, bias="none", modules_to_save=list(cfg.modules_to_save) or None)
    over = "causal_lm" if getattr(module, "get_output_embeddings", lambda: None)() is not None else "backbone"
    peft_model = get_peft_model(module, peft_cfg)
    object.__setattr__(module, "_rlhf_fast_lora", LoraHandle(peft_model, over))  # not a submodule
    return module


def lora_handle(module) -> Optional[LoraHandle]:
    """The ``LoraHandle`` of an adapted HF module or of a wrapper around one (``Policy.model``,
    ``RewardModel.backbone``, ``Critic.backbone``, a DeepSpeed engine's ``module``); else None."""
    for m in (module, getattr(module, "module", None)):
        for inner in (m, getattr(m, "model", None), getattr(m, "backbone", None)):
            handle = inner.__dict__.get("_rlhf_fast_lora") if isinstance(inner, nn.Module) else None
            if handle is not None:
                return handle
    return None


def has_lora(module) -> bool:
    return lora_handle(module) is not None


def adapters_disabled(module) -> contextlib.AbstractContextManager:
    """peft's ``disable_adapter()`` context for an adapted module (or wrapper): inside it the model
    computes its base weights only. A no-op for a module without adapters."""
    handle = lora_handle(module)
    return handle.peft_model.disable_adapter() if handle is not None else contextlib.nullcontext()


class AdaptersOff:
    """The frozen reference policy of a LoRA policy: ``logprobs`` of the policy with its adapters
    disabled. It holds no weights of its own; ``parameters()`` are the policy's base weights."""

    def __init__(self, policy: nn.Module):
        if not has_lora(policy):
            raise ValueError("AdaptersOff needs a policy with LoRA adapters (models.lora.add_lora)")
        self.policy = policy

    def logprobs(self, input_ids, attention_mask, **kwargs):
        with adapters_disabled(self.policy), torch.no_grad():
            return self.policy.logprobs(input_ids, attention_mask, **kwargs)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The policy's base weights (no adapter, no value head): what the reference computes with."""
        for name, p in self.policy.named_parameters():
            if "lora_" not in name and not name.startswith("value_head."):
                yield p


def trainable_parameter_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


# ---- saving ---------------------------------------------------------------------------------------


def _plain_state_dict(hf_module: nn.Module, *, merged: bool) -> dict[str, torch.Tensor]:
    """The state dict of the HF module as it was before adapters were injected (``merged``: with
    each adapter's ``scaling * B A`` added to its base weight, through peft's ``get_delta_weight``,
    which handles Conv1D's transposed layout, and the trained copies of ``modules_to_save``)."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in hf_module.named_modules() if isinstance(m, LoraLayer)}
    out = {}
    for key, value in hf_module.state_dict().items():
        if "lora_" in key:
            continue
        # modules_to_save: peft keeps the frozen original and the trained copy side by side
        if ".original_module." in key:
            if merged:
                continue
            key = key.replace(".original_module.", ".")
        elif ".modules_to_save." in key:
            if not merged:
                continue
            owner, rest = key.split(".modules_to_save.", 1)
            key = f"{owner}.{rest.split('.', 1)[1]}"  # drop the adapter name
        if ".base_layer." in key:
            owner, pname = key.split(".base_layer.", 1)
            if merged and pname == "weight":
                layer = layers[owner]
                for adapter in layer.active_adapters:
                    value = value + layer.get_delta_weight(adapter).to(value.dtype)
            key = f"{owner}.{pname}"
        out[key] = value.detach()
    return out


def _with_state_dict(wrapper: nn.Module, directory: Path, state_dict: dict) -> None:
    """``wrapper.save_pretrained(directory)`` with the HF files written from ``state_dict``."""
    wrapper.save_pretrained(directory, state_dict=state_dict)


def save_model(wrapper: nn.Module, directory, *, merged: bool = False) -> None:
    """Saves a ``Policy`` / ``RewardModel`` / ``Critic``: as ``wrapper.save_pretrained`` without
    adapters; with adapters in the LoRA layout of the module docstring (``merged``: also merged/).
    Under ZeRO-3 call it inside ``deepspeed_setup.full_parameters`` (the trainers' save does)."""
    directory = Path(directory)
    handle = lora_handle(wrapper)
    if handle is None:
        wrapper.save_pretrained(directory)
        return
    hf_module = handle.peft_model.get_base_model()
    directory.mkdir(parents=True, exist_ok=True)
    _with_state_dict(wrapper, directory / BASE_DIR, _plain_state_dict(hf_module, merged=False))
    handle.peft_model.save_pretrained(str(directory))  # adapter_config.json + adapter_model.safetensors
    cfg_path = directory / ADAPTER_CONFIG
    adapter_cfg = json.loads(cfg_path.read_text())
    adapter_cfg["base_model_name_or_path"] = str((directory / BASE_DIR).resolve())
    cfg_path.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True) + "\n")
    for name in (_io.HEADS_FILE, _io.META_FILE):  # the wrapper's heads and metadata, beside the adapter
        if (directory / BASE_DIR / name).is_file():
            shutil.copyfile(directory / BASE_DIR / name, directory / name)
    meta = json.loads((directory / _io.META_FILE).read_text())
    meta["lora"] = {"base": BASE_DIR, "over": handle.over, "merged": MERGED_DIR if merged else None,
                    "rank": adapter_cfg.get("r"), "alpha": adapter_cfg.get("lora_alpha"),
                    "target_modules": sorted(adapter_cfg.get("target_modules") or [])}
    (directory / _io.META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if merged:
        _with_state_dict(wrapper, directory / MERGED_DIR, _plain_state_dict(hf_module, merged=True))


# ---- loading --------------------------------------------------------------------------------------


def is_adapter_dir(path) -> bool:
    """A directory written by ``save_model`` with adapters (adapter files, no top-level config.json)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file() and not (p / "config.json").is_file()


def load_merged(directory, *, want: str, load_base):
    """The model saved in the LoRA ``directory``, with its adapter merged into the base weights
    (peft ``PeftModel.from_pretrained`` + ``merge_and_unload``). ``want``: "causal_lm" or
    "backbone"; ``load_base(path, over)`` loads base/ as the class the adapter was trained on.
    A backbone is taken out of a merged causal LM; a causal LM cannot come from a backbone."""
    from peft import PeftModel

    directory = Path(directory)
    _, meta = _io.load_extras(directory)
    info = meta.get("lora") or {}
    over = info.get("over", "causal_lm")
    if want == "causal_lm" and over != "causal_lm":
        raise ValueError(f"{directory}: a LoRA {meta.get('kind', 'model')} adapted over a backbone has no LM head; "
                         "it cannot load as a causal LM")
    base_dir = directory / info.get("base", BASE_DIR)
    if not (base_dir / "config.json").is_file():
        raise ValueError(f"{directory}: LoRA adapter without its base model ({base_dir} has no config.json)")
    base = load_base(base_dir, over)
    model = PeftModel.from_pretrained(base, str(directory), is_trainable=False).merge_and_unload()
    return backbone_of(model) if want == "backbone" and over == "causal_lm" else model
