"""Input validation shared by the ops and the reference: clear ValueErrors that name the argument.

Checks that need the tensor's values (label range, finiteness) synchronise with the device; they
are skipped while torch.compile traces (``torch.compiler.is_compiling()``), where the kernels'
own guards (out-of-range labels give NaN, never an out-of-bounds read) still hold.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch._guards import detect_fake_mode

FLOATING = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def tracing(*tensors: torch.Tensor) -> bool:
    """Whether value checks (data-dependent, a host sync) must be skipped: under torch.compile,
    inside a FakeTensorMode (shape inference), or for meta tensors, which hold no values."""
    if torch.compiler.is_compiling():
        return True
    return detect_fake_mode() is not None or any(t.device.type == "meta" for t in tensors)


def check_tensor(name: str, x, *, floating: bool | None = None, min_dim: int = 0) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating is True and x.dtype not in FLOATING:
        raise ValueError(
            f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {x.dtype}"
        )
    if floating is False and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for k, v in items[1:]:
        if v.device != first.device:
            raise ValueError(f"{k} is on {v.device} but {first_name} is on {first.device}")


def check_int(name: str, value, lo: int, hi: Optional[int] = None, what: Optional[str] = None) -> int:
    """A Python int (not a bool) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be {what or f'an int >= {lo}'}, got {value!r}")
    return value


def check_real(name: str, value) -> float:
    """A real number (int or float, not a bool or a string), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_positive_finite(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return v


def check_labels(labels: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels") -> None:
    """Labels must lie in [0, vocab) or equal ignore_index. One host sync (skipped when tracing)."""
    if tracing(labels) or labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):  # CPU-GPU sync point: the price of a clear error instead of a NaN
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name}{list(idx)} = {int(labels[idx])} is outside [0, {vocab}) and is not "
            f"ignore_index={ignore_index}"
        )


def check_logprob_inputs(logits, labels, temperature, ignore_index) -> float:
    """Validates ``gather_logprobs`` arguments; returns the temperature as a float."""
    check_tensor("logits", logits, floating=True, min_dim=1)
    check_tensor("labels", labels, floating=False)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, "
            f"got {tuple(labels.shape)}"
        )
    check_same_device(logits=logits, labels=labels)
    temperature = check_positive_finite("temperature", temperature)
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a non-empty last (vocabulary) dimension")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be a Python int, got {ignore_index!r}")
    check_labels(labels, logits.shape[-1], ignore_index)
    return temperature


def check_linear_logprob_inputs(hidden, weight, labels, temperature, ignore_index) -> float:
    """Validates ``linear_logprobs`` arguments; returns the temperature as a float."""
    check_tensor("hidden", hidden, floating=True, min_dim=1)
    check_tensor("weight", weight, floating=True)
    check_tensor("labels", labels, floating=False)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H), got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight.shape[1] ({weight.shape[1]})"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    check_same_device(hidden=hidden, weight=weight, labels=labels)
    temperature = check_positive_finite("temperature", temperature)
    if weight.shape[0] == 0:
        raise ValueError("weight must have a non-empty first (vocabulary) dimension")
    if weight.shape[1] == 0:
        raise ValueError("hidden size H (weight.shape[1], hidden.shape[-1]) must be >= 1, got 0")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be a Python int, got {ignore_index!r}")
    check_labels(labels, weight.shape[0], ignore_index)
    return temperature
