"""Input validation for the reward / advantage math (kl_penalty, shape_rewards, gae, whitening),
shared by ``rlhf_fast.ops`` and ``rlhf_fast.reference``: clear ValueErrors that name the argument.

Value checks (finiteness, 0/1 masks) synchronise with the device once per argument; they are
skipped while torch.compile traces. Finiteness is checked on valid tokens only: masked positions
are ignored by every op (padding such as INVALID_LOGPROB = 1.0 or NaN is allowed there).
"""

from __future__ import annotations

import math

import torch

from rlhf_fast._checks import check_same_device, check_tensor, tracing

#: KL estimators by name (a table, not an if-chain: docs/architecture.md, "Variation points"). Each maps d = logprobs -
#: ref_logprobs to the per-token penalty; Schulman, "Approximating KL Divergence" (2020).
KL_ESTIMATORS = ("k1", "k2", "k3")


def check_estimator(estimator) -> str:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return estimator


def check_clamp(clamp) -> float | None:
    if clamp is None:
        return None
    try:
        c = float(clamp)
    except (TypeError, ValueError):
        raise ValueError(f"clamp must be None or a number, got {clamp!r}") from None
    if not (c > 0) or math.isnan(c):
        raise ValueError(f"clamp must be None or > 0, got {clamp!r}")
    return c


def check_finite_scalar(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def check_unit_interval(name: str, value) -> float:
    v = check_finite_scalar(name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return v


def check_same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def check_mask(mask, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Returns the mask as bool. Accepts bool or 0/1 (integer or floating) of ``like``'s shape."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(like.shape):
        raise ValueError(f"mask must have the shape of {like_name} {tuple(like.shape)}, got {tuple(mask.shape)}")
    check_same_device(**{like_name: like, "mask": mask})
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"mask must be bool or 0/1, got {mask.dtype}")
    if not tracing(mask) and mask.numel() and bool(((mask != 0) & (mask != 1)).any()):  # CPU-GPU sync point
        raise ValueError("mask must be bool or hold only 0 and 1")
    return mask != 0


def check_finite_rows(name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raises naming the first row (index over all but the last dim) with a non-finite valid entry.
    With ``mask=None``, every entry of ``x`` is checked and the row index is the entry's index."""
    if tracing(x) or x.numel() == 0:
        return
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask
    if bool(bad.any()):  # CPU-GPU sync point: the price of a clear error instead of NaN advantages
        idx = [int(i) for i in bad.nonzero()[0].tolist()]
        row, col = (idx[:-1], idx[-1]) if mask is not None else (idx, None)
        where = f" at token {col}" if col is not None else ""
        raise ValueError(f"{name} has a non-finite value {x[tuple(idx)].item()} in row {row}{where}")


def check_float(name: str, x, *, min_dim: int = 0) -> None:
    check_tensor(name, x, floating=True, min_dim=min_dim)


def check_kl_inputs(logprobs, ref_logprobs, estimator, clamp):
    check_float("logprobs", logprobs)
    check_float("ref_logprobs", ref_logprobs)
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs)
    check_same_device(logprobs=logprobs, ref_logprobs=ref_logprobs)
    return check_estimator(estimator), check_clamp(clamp)


def check_shape_rewards_inputs(scores, logprobs, ref_logprobs, mask, kl_coef, estimator, clamp, *,
                               check_finite: bool = True):
    """Returns (bool mask, kl_coef, estimator, clamp). ``check_finite=False`` leaves the finiteness
    of the scores to the caller (the C++ CPU kernel checks it while it runs: ops/rlmath.py)."""
    estimator, clamp = check_kl_inputs(logprobs, ref_logprobs, estimator, clamp)
    if logprobs.dim() < 1:
        raise ValueError(f"logprobs must have at least 1 dimension (..., T), got shape {tuple(logprobs.shape)}")
    check_float("scores", scores)
    if tuple(scores.shape) != tuple(logprobs.shape[:-1]):
        raise ValueError(
            f"scores must have shape logprobs.shape[:-1] = {tuple(logprobs.shape[:-1])}, got {tuple(scores.shape)}"
        )
    check_same_device(logprobs=logprobs, scores=scores)
    mask = check_mask(mask, logprobs, "logprobs")
    kl_coef = check_finite_scalar("kl_coef", kl_coef)
    if check_finite:
        check_finite_rows("scores", scores)
    return mask, kl_coef, estimator, clamp


def check_gae_inputs(rewards, values, mask, gamma, lam, *, check_finite: bool = True):
    """Returns (bool mask, gamma, lam). ``check_finite=False`` leaves the finiteness of rewards and
    values to the caller (the op checks its output once instead: see ``check_gae_outputs``)."""
    check_float("rewards", rewards, min_dim=1)
    check_float("values", values, min_dim=1)
    check_same_shape("rewards", rewards, values=values)
    check_same_device(rewards=rewards, values=values)
    mask = check_mask(mask, rewards, "rewards")
    gamma = check_unit_interval("gamma", gamma)
    lam = check_unit_interval("lam", lam)
    if check_finite:
        check_finite_rows("rewards", rewards, mask)
        check_finite_rows("values", values, mask)
    return mask, gamma, lam


def check_gae_outputs(returns, rewards, values, mask) -> None:
    """A non-finite reward or value on a valid token makes that token's return NaN or inf (an inf
    value v gives -inf + inf), so one reduction over the returns replaces two full scans of the
    inputs on the fast path; only when it trips are the inputs scanned, to name the row. A finite
    sum that overflowed to inf finds no culprit and passes."""
    if tracing(returns) or returns.numel() == 0:
        return
    if not bool(torch.isfinite(returns.sum())):  # CPU-GPU sync point
        check_finite_rows("rewards", rewards, mask)
        check_finite_rows("values", values, mask)


def check_shape_rewards_outputs(kl, logprobs, ref_logprobs, mask) -> None:
    """As ``check_gae_outputs``: a non-finite log-prob on a valid token makes that token's kl
    non-finite (kl is 0 on masked ones), so one reduction replaces two scans; when it trips, the
    inputs are scanned to name the row (before, the NaN passed through and GAE blamed the
    rewards). A clamp that bounds an inf difference leaves nothing to report."""
    if tracing(kl) or kl.numel() == 0:
        return
    if not bool(torch.isfinite(kl.sum())):  # CPU-GPU sync point
        check_finite_rows("logprobs", logprobs, mask)
        check_finite_rows("ref_logprobs", ref_logprobs, mask)


def check_whiten_inputs(x, mask, eps=0.0):
    """Returns (bool mask, eps)."""
    check_float("x", x)
    mask = check_mask(mask, x, "x")
    eps = check_finite_scalar("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    return mask, eps
