"""Switching the training module into inference for one ``generate`` call, and back.

- ``unwrap``: a DeepSpeed engine, a ``Policy`` or a plain HF causal LM -> (the module whose mode we
  switch, the HF causal LM we call, the DeepSpeed engine or None). No parameter is copied.
- ``inference_mode``: eval() (dropout off), gradient checkpointing off, ``torch.no_grad``, and the
  LM head's input made contiguous (``_contiguous_input``); every module's previous ``training`` flag
  and checkpointing flag are restored afterwards, and the hook removed, even on error.
- ``zero3_gathered``: under ZeRO-3, all-gathers every parameter once for the whole call and lifts
  ZeRO's per-module fetch / release hooks while it lasts, so a decode step launches no
  collectives (with the hooks on, every submodule call of every step would fetch and release its
  parameters). This is what TRL's ``unwrap_model_for_generation`` and DeepSpeed's
  ``zero.stage3.unwrap_model_for_generation`` do, with the hooks restored in a ``finally``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn


def is_deepspeed_engine(obj) -> bool:
    try:
        from deepspeed import DeepSpeedEngine
    except Exception:  # deepspeed missing or broken on this machine
        return False
    return isinstance(obj, DeepSpeedEngine)


def unwrap(model) -> tuple[nn.Module, nn.Module, Optional[object]]:
    """(module to switch modes on, HF causal LM to call, DeepSpeed engine or None)."""
    from transformers import PreTrainedModel

    ds = model if is_deepspeed_engine(model) else None
    inner = model.module if ds is not None else model
    if isinstance(inner, PreTrainedModel):
        return inner, inner, ds
    lm = getattr(inner, "model", None)  # rlhf_fast.models.Policy (or any wrapper exposing .model)
    if isinstance(inner, nn.Module) and isinstance(lm, PreTrainedModel):
        return inner, lm, ds
    raise ValueError(
        f"HybridEngine wraps a Hugging Face causal LM, a rlhf_fast Policy, or a DeepSpeed engine around either; "
        f"got {type(inner).__name__}"
    )


def _contiguous_input(_head: nn.Module, args: tuple):
    """Forward pre-hook of the LM head during generation. HF's ``logits_to_keep`` hands the head
    ``hidden[:, -1:]``, a non-contiguous (B, 1, H) view after a prefill; with a frozen head (LoRA)
    torch's linear then takes a batched matmul that copies the (V, H) weight B times instead of one
    GEMM: at V = 151,936, H = 896, B = 8 a 12 s prefill in bf16 (2 s against 16 ms per call), 1.6x
    and other bits in float32 (issue 35). A trained head already takes the GEMM, on the same bits
    as this contiguous copy of B x H values."""
    x = args[0]
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def _output_embeddings(module: nn.Module) -> Optional[nn.Module]:
    for m in (module, getattr(module, "model", None)):
        if m is not None and hasattr(m, "get_output_embeddings"):
            head = m.get_output_embeddings()
            if isinstance(head, nn.Module):
                return head
    return None


@contextlib.contextmanager
def inference_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    head = _output_embeddings(module)
    hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    # HF layers checkpoint only when `gradient_checkpointing and training`, so eval() already
    # turns it off; clearing the flag as well keeps any other wrapper from re-enabling it.
    ckpt = [m for m in module.modules() if getattr(m, "gradient_checkpointing", None) is True]
    try:
        module.eval()
        for m in ckpt:
            m.gradient_checkpointing = False
        with torch.no_grad():
            yield
    finally:
        if hook is not None:
            hook.remove()
        for m in ckpt:
            m.gradient_checkpointing = True
        for m, training in modes:
            m.training = training


def zero3_params(module: nn.Module) -> list[torch.nn.Parameter]:
    """Parameters partitioned by ZeRO-3 (they carry a ``ds_id``)."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def _param_offload(ds_engine):
    opt = getattr(ds_engine, "optimizer", None) if ds_engine is not None else None
    if opt is None:
        return None
    offload = getattr(opt, "parameter_offload", None) or opt
    return offload if hasattr(offload, "forward_hooks") else None


@contextlib.contextmanager
def zero3_gathered(module: nn.Module, ds_engine=None, on_gather=None) -> Iterator[bool]:
    """Gathers ``module``'s ZeRO-3 parameters once and lifts the engine's fetch hooks; yields
    whether anything was gathered. A no-op (yields False) when no parameter is partitioned.
    ``on_gather`` is called once per real gather (the engine counts them; tests read the count)."""
    params = zero3_params(module)
    if not params:
        yield False
        return
    import deepspeed

    if on_gather is not None:
        on_gather()
    # modifier_rank=None: read-only, nothing is scattered back at exit.
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        offload = _param_offload(ds_engine)
        lifted = False
        if offload is not None and (offload.forward_hooks or offload.backward_hooks):
            for p in params:  # nothing is "in use" by a submodule while the hooks are off
                getattr(p, "ds_active_sub_modules", set()).clear()
            for hook in (*offload.forward_hooks, *offload.backward_hooks):
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            lifted = True
        try:
            yield True
        finally:
            if lifted:
                register = getattr(offload, "_register_deepspeed_module", None) or getattr(
                    offload, "_register_hooks_recursively"
                )
                register(offload.module)
