"""Packed sequences: the valid tokens of a padded (B, T) batch laid out without padding.

A padded batch (left-padded prompts + right-padded responses, see docs/architecture.md "One PPO
iteration") spends the backbone's compute on pad tokens. ``PackPlan`` moves each row's valid tokens
(``attention_mask == 1``, in order) into a packed layout (``rows`` x ``width``): several sequences
per row, each with position ids ``0 .. n-1`` (the ``cumsum(mask) - mask`` positions of the padded
row, so its outputs are the padded row's outputs), trailing slots filled with position 0.

How attention stays inside a sequence: the backbone gets ``attention_mask=None`` and those
restarting position ids; transformers' mask builder (``masking_utils.find_packed_sequence_indices``,
used by every model whose module calls ``create_causal_mask``) then makes the block-diagonal causal
mask for sdpa / eager, and the flash-attention path reads the restarts as ``cu_seqlens`` (varlen).
Flash-attention only reads them for a single row, so its layout is one stream; sdpa / eager build a
dense (rows, width, width) mask, so their rows are bins of the longest sequence's width (first-fit
decreasing): the attention costs what the padded batch would cost on its real tokens.

The model outputs are scattered back (``PackPlan.unpack``) to (B, T) before the heads: the LM head,
value head and every piece of RL math see the padded layout they always saw (zeros at pads).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from rlhf_fast.models.heads import position_ids_from_mask


@dataclass(frozen=True)
class PackingLayout:
    """How one attention implementation takes packed rows. one_stream: all sequences in a single
    row (flash-attention's varlen path reads packed position ids only for batch size 1)."""

    one_stream: bool


# attention implementation -> layout; an implementation not listed cannot pack (a ValueError).
PACKING_LAYOUTS = {
    "sdpa": PackingLayout(one_stream=False),
    "eager": PackingLayout(one_stream=False),
    "flash_attention_2": PackingLayout(one_stream=True),
    "flash_attention_3": PackingLayout(one_stream=True),
}


def attn_implementation_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_attn_implementation", None) or "eager")


# Widest attention (query length) at which a bf16 / fp16 backbone on the CPU runs sdpa's math
# backend instead of its flash kernel. Measured (2-core AMD EPYC Zen 5, torch 2.13, 1 thread,
# causal + mask, 4 heads of 64, forward + backward): bf16 width 24 flash 7.2 ms vs math 2.3 ms,
# 128: 9.9 vs 6.0, 512: 29.8 vs 35.7, 1024: 42.8 vs 73.2; float32 flash is already fast
# (width 24: 1.5 vs 1.7 ms), so float32 keeps the default choice.
CPU_REDUCED_SDPA_MATH_MAX_WIDTH = 256


def attention_context(backbone: nn.Module, width: int):
    """The context a training / scoring forward of ``backbone`` runs in: sdpa's math backend for a
    bf16 / fp16 backbone on the CPU at widths up to ``CPU_REDUCED_SDPA_MATH_MAX_WIDTH`` (the flash
    kernel's reduced-precision backward is slow there, see above), else no change. A function of
    the dtype, device and width alone, so the experience and the update forwards of a micro-batch
    take the same path (the first PPO ratio stays exactly 1)."""
    if attn_implementation_of(backbone) != "sdpa" or width > CPU_REDUCED_SDPA_MATH_MAX_WIDTH:
        return contextlib.nullcontext()
    p = next(backbone.parameters(), None)
    if p is None or p.device.type != "cpu" or p.dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def packing_unsupported(model: nn.Module) -> Optional[str]:
    """Why ``model`` (a HF backbone or causal LM) cannot run packed rows, or None when it can: its
    attention implementation is not in ``PACKING_LAYOUTS``, or its modeling module does not build
    its mask with transformers' packed-sequence-aware ``create_causal_mask``."""
    impl = attn_implementation_of(model)
    if impl not in PACKING_LAYOUTS:
        return f"attention implementation {impl!r} cannot pack (known: {', '.join(sorted(PACKING_LAYOUTS))})"
    try:
        masking = importlib.import_module("transformers.masking_utils")
    except ImportError:
        masking = None
    if masking is None or not hasattr(masking, "find_packed_sequence_indices"):
        return "this transformers version does not detect packed sequences (masking_utils.find_packed_sequence_indices)"
    module = inspect.getmodule(type(model))
    if module is None or not hasattr(module, "create_causal_mask"):
        return f"{type(model).__name__} does not build its attention mask with masking_utils.create_causal_mask"
    return None


def check_packable(model: nn.Module, *, field: str) -> None:
    """ValueError naming the config ``field`` when ``model`` cannot pack."""
    why = packing_unsupported(model)
    if why is not None:
        raise ValueError(f"{field}: {type(model).__name__} cannot run packed sequences: {why}; set {field} false")


def resolve_packing(setting: Optional[bool], model: nn.Module, *, field: str) -> bool:
    """A stage's ``packing`` setting -> whether it packs: None (the default) packs when the model
    can, True requires it (``check_packable``), False keeps the padded layout."""
    if setting is None:
        why = packing_unsupported(model)
        if why is not None:  # the default asked for packing where possible: say that it is not
            warnings.warn(f"{field}: running padded batches, {type(model).__name__} cannot pack: {why} "
                          f"(set {field} false to silence this)", RuntimeWarning, stacklevel=2)
        return why is None
    if setting:
        check_packable(model, field=field)
    return bool(setting)


@dataclass(frozen=True)
class PackPlan:
    """Where each valid token of a padded (B, T) batch goes in the packed (rows, width) layout.

    src: (N,) int64 flat indices (into B * T) of the valid tokens, row by row in order.
    dst: (N,) int64 flat indices (into rows * width) of their packed slots.
    """

    src: torch.Tensor
    dst: torch.Tensor
    batch: int
    length: int
    rows: int
    width: int

    @property
    def tokens(self) -> int:
        return int(self.src.numel())

    def pack(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """(B, T, ...) -> (rows, width, ...); empty slots hold ``fill``. Differentiable."""
        rest = tuple(x.shape[2:])
        flat = x.reshape(self.batch * self.length, *rest)
        out = flat.new_full((self.rows * self.width, *rest), fill)
        return out.index_copy(0, self.dst, flat.index_select(0, self.src)).view(self.rows, self.width, *rest)

    def unpack(self, y: torch.Tensor, fill=0) -> torch.Tensor:
        """(rows, width, ...) -> (B, T, ...); pad positions hold ``fill``. Differentiable."""
        rest = tuple(y.shape[2:])
        flat = y.reshape(self.rows * self.width, *rest)
        out = flat.new_full((self.batch * self.length, *rest), fill)
        return out.index_copy(0, self.src, flat.index_select(0, self.dst)).view(self.batch, self.length, *rest)


def _first_fit(lengths: list[int], capacity: int) -> tuple[list[int], list[int], int]:
    """First-fit decreasing: (bin of each row, offset in its bin, number of bins). Ties keep row
    order, so the plan is a function of the lengths alone (the same micro-batch packs the same
    way in the experience and the update: docs/architecture.md "Numerical contract", ratio 1)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    fill: list[int] = []
    where, offset = [0] * len(lengths), [0] * len(lengths)
    for i in order:
        n = lengths[i]
        k = next((k for k, used in enumerate(fill) if used + n <= capacity), len(fill))
        if k == len(fill):
            fill.append(0)
        where[i], offset[i] = k, fill[k]
        fill[k] += n
    return where, offset, len(fill)


def plan_packing(attention_mask: torch.Tensor, *, one_stream: bool = False, width: Optional[int] = None
                 ) -> Optional[PackPlan]:
    """The packed layout of a (B, T) mask: bins as wide as ``width`` (default: the longest row),
    or one row holding every token with ``one_stream``; None when a row's attended tokens are not
    contiguous (a hole): the caller then runs the padded batch. A host sync (the row lengths)."""
    mask = attention_mask.bool()
    B, T = mask.shape
    idx = torch.arange(T, device=mask.device)
    first = torch.where(mask, idx, T).amin(-1) if T else mask.sum(-1)
    last = torch.where(mask, idx, -1).amax(-1) if T else mask.sum(-1)
    stats = torch.stack([mask.sum(-1), last - first + 1]).tolist()  # host sync: the layout is decided on the host
    lengths = stats[0]
    if any(n and span != n for n, span in zip(*stats)):
        # a token after a hole is predicted, in the padded layout, from the hole's hidden state,
        # which packing drops: such a batch runs padded (the callers' fallback), so packed == padded
        return None
    total = int(sum(lengths))
    longest = max(lengths) if lengths else 0
    cap = max(total, 1) if one_stream else max(width or longest, longest, 1)
    where, offset, rows = _first_fit(lengths, cap)
    rows = max(rows, 1)
    base = torch.tensor([w * cap + o for w, o in zip(where, offset)], dtype=torch.long, device=mask.device)  # (B,)
    src = mask.reshape(-1).nonzero().squeeze(-1)  # (N,)
    pos = position_ids_from_mask(mask).reshape(-1)[src]  # (N,) 0 .. n-1 within each row
    dst = base[src // T] + pos
    return PackPlan(src=src, dst=dst, batch=B, length=T, rows=rows, width=cap)


def packed_backbone(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    plan: Optional[PackPlan] = None) -> Optional[torch.Tensor]:
    """Final hidden state (B, T, H) of ``backbone`` for a padded batch, computed on its packed
    layout (see the module docstring); pad positions hold zeros. None for a mask with a hole
    (``plan_packing``): the caller runs the padded batch."""
    plan = plan_for(backbone, attention_mask) if plan is None else plan
    if plan is None:
        return None
    positions = plan.pack(position_ids_from_mask(attention_mask))  # (rows, width) restarting at 0
    with attention_context(backbone, plan.width):
        out = backbone(input_ids=plan.pack(input_ids), attention_mask=None, position_ids=positions, use_cache=False)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state  # (rows, width, H)
    return plan.unpack(hidden)


def set_packing(setting: Optional[bool], field: str, *models) -> list[bool]:
    """Sets ``.packing`` on each model wrapper (``Policy``, ``RewardModel``, ``Critic``; None and
    objects without the attribute are skipped) from a stage's ``packing`` setting
    (``resolve_packing`` on its backbone). Returns what each one got."""
    out = []
    for m in models:
        if m is None or not hasattr(m, "packing"):
            continue
        m.packing = resolve_packing(setting, m.backbone, field=field)
        out.append(m.packing)
    return out


def plan_for(model: nn.Module, attention_mask: torch.Tensor, *, width: Optional[int] = None) -> Optional[PackPlan]:
    """``plan_packing`` with the layout ``model``'s attention implementation takes."""
    layout = PACKING_LAYOUTS.get(attn_implementation_of(model))
    if layout is None:
        check_packable(model, field="packing")
    return plan_packing(attention_mask, one_stream=layout.one_stream, width=width)


def packed_lm_batch(plan: PackPlan, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                    *, ignore_index: int = -100) -> tuple[dict, torch.Tensor]:
    """A causal LM's packed inputs and next-token targets for a padded (B, T) batch with ``labels``
    (B, T) (``ignore_index`` where not a target): ``(model kwargs, targets (rows, width))``; entry
    ``targets[r, j]`` is the label the logits at packed slot (r, j) predict (``labels[b, t + 1]``
    for the token at (b, t)), ``ignore_index`` at the end of each sequence and in empty slots.
    ``sum(log p(targets))`` then equals the padded ``logits[:, :-1]`` / ``labels[:, 1:]`` sum."""
    nxt = torch.full_like(labels, ignore_index)
    nxt[:, :-1] = labels[:, 1:].masked_fill(~attention_mask[:, 1:].bool(), ignore_index)
    kwargs = dict(input_ids=plan.pack(input_ids), attention_mask=None,
                  position_ids=plan.pack(position_ids_from_mask(attention_mask)), use_cache=False)
    return kwargs, plan.pack(nxt, fill=ignore_index)
