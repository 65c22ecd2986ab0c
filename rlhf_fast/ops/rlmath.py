"""KL penalty, reward shaping, GAE and masked whitening as fused custom ops.

``torch.ops.rlhf_fast.{kl_penalty, shape_rewards, gae, masked_moments, masked_whiten_apply}``
dispatch to C++ kernels on CPU (csrc/rlmath*.cpp) and Triton kernels on CUDA (kernels/rlmath.py);
fake kernels let torch.compile trace them; ``kl_penalty`` has autograd (w.r.t. both inputs).
Whitening is split into its two passes, ``masked_moments`` -> (count, mean, M2) and
``masked_whiten_apply``, so that with a process group the statistics are all-reduced in between
(one collective of 3 float64 numbers) and nothing synchronises with the host.

Semantics: docs/architecture.md, "Ops". The oracle is ``rlhf_fast.reference.rlmath``.
"""

from __future__ import annotations

import math

import torch

from rlhf_fast import _rlmath_checks as C
from rlhf_fast.ops import _library
from rlhf_fast.reference import rlmath as ref

# Mirrors TORCH_LIBRARY_FRAGMENT in csrc/rlmath.cpp (used only when the C++ library cannot be
# built); a test checks the two agree.
SCHEMAS = {
    "kl_penalty": "kl_penalty(Tensor logprobs, Tensor ref_logprobs, str estimator='k1', float? clamp=None) -> Tensor",
    "shape_rewards": (
        "shape_rewards(Tensor scores, Tensor logprobs, Tensor ref_logprobs, Tensor mask, float kl_coef, "
        "str estimator='k1', float? clamp=None) -> (Tensor, Tensor)"
    ),
    "gae": "gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)",
    "masked_moments": "masked_moments(Tensor x, Tensor mask) -> Tensor",
    "masked_whiten_apply": (
        "masked_whiten_apply(Tensor x, Tensor mask, Tensor stats, bool shift_mean=True, bool unbiased=True, "
        "float eps=1e-08) -> Tensor"
    ),
}


# ---- CPU fallback (no compiler): the reference in float32 ------------------------------------

def _kl_torch(logprobs, ref_logprobs, estimator="k1", clamp=None):
    return ref.kl_penalty(logprobs, ref_logprobs, estimator=estimator, clamp=clamp, compute_dtype=torch.float32)


def _shape_rewards_torch(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1", clamp=None):
    return ref.shape_rewards(
        scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, estimator=estimator, clamp=clamp,
        compute_dtype=torch.float32,
    )


def _gae_torch(rewards, values, mask, gamma, lam):
    return ref.gae(rewards, values, mask, gamma=gamma, lam=lam, compute_dtype=torch.float32)


def _moments_torch(x, mask):
    n, mean, m2 = ref._moments(x, mask, None, torch.float64)
    return torch.stack([n, mean, m2])


def _apply_torch(x, mask, stats, shift_mean=True, unbiased=True, eps=1e-8):
    n, mean, m2 = stats.double().unbind()
    var = ref._var(n, m2, unbiased)
    y = (x.double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return torch.where(mask, y, 0.0).float()


# ---- CUDA: Triton ----------------------------------------------------------------------------

def _kl_cuda(logprobs, ref_logprobs, estimator="k1", clamp=None):
    from rlhf_fast.kernels.rlmath import kl_penalty_fwd

    return kl_penalty_fwd(logprobs, ref_logprobs, estimator, clamp)


def _shape_rewards_cuda(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1", clamp=None):
    from rlhf_fast.kernels.rlmath import shape_rewards_fwd

    return shape_rewards_fwd(scores, logprobs, ref_logprobs, mask, kl_coef, estimator, clamp)


def _gae_cuda(rewards, values, mask, gamma, lam):
    from rlhf_fast.kernels.rlmath import gae_fwd

    return gae_fwd(rewards, values, mask, gamma, lam)


def _moments_cuda(x, mask):
    from rlhf_fast.kernels.rlmath import masked_moments_fwd

    return masked_moments_fwd(x, mask)


def _apply_cuda(x, mask, stats, shift_mean=True, unbiased=True, eps=1e-8):
    from rlhf_fast.kernels.rlmath import masked_whiten_apply_fwd

    return masked_whiten_apply_fwd(x, mask, stats, shift_mean, unbiased, eps)


# ---- fake (meta) kernels, autograd -----------------------------------------------------------

def _kl_fake(logprobs, ref_logprobs, estimator="k1", clamp=None):
    return logprobs.new_empty(logprobs.shape, dtype=torch.float32)


def _shape_rewards_fake(scores, logprobs, ref_logprobs, mask, kl_coef, estimator="k1", clamp=None):
    return tuple(logprobs.new_empty(logprobs.shape, dtype=torch.float32) for _ in range(2))


def _gae_fake(rewards, values, mask, gamma, lam):
    return tuple(rewards.new_empty(rewards.shape, dtype=torch.float32) for _ in range(2))


def _moments_fake(x, mask):
    return x.new_empty((3,), dtype=torch.float64)


def _apply_fake(x, mask, stats, shift_mean=True, unbiased=True, eps=1e-8):
    return x.new_empty(x.shape, dtype=torch.float32)


def _kl_setup_context(ctx, inputs, output):
    logprobs, ref_logprobs, estimator, clamp = inputs
    ctx.save_for_backward(logprobs, ref_logprobs)
    ctx.estimator, ctx.clamp = estimator, clamp


def _kl_backward(ctx, grad):
    # Elementwise and cheap: plain torch (a few fused-by-inductor ops), float32 math.
    logprobs, ref_logprobs = ctx.saved_tensors
    d = logprobs.float() - ref_logprobs.float()
    g = grad.float()
    dvalue = ref.KL_FORMULAS[ctx.estimator].dvalue
    if dvalue is not None:
        g = g * dvalue(d)
    if ctx.clamp is not None:
        # torch.clamp's convention: gradient passes where min <= k <= max, else 0 (a select, so an
        # inf slope outside the clamp never turns into 0 * inf = NaN).
        k = torch.ops.rlhf_fast.kl_penalty(logprobs, ref_logprobs, ctx.estimator, None)
        g = torch.where((k >= -ctx.clamp) & (k <= ctx.clamp), g, 0.0)
    grad_lp = g.to(logprobs.dtype) if ctx.needs_input_grad[0] else None
    grad_ref = (-g).to(ref_logprobs.dtype) if ctx.needs_input_grad[1] else None
    return grad_lp, grad_ref, None, None


def _register() -> None:
    if not _library.load_extension():
        _library.define_fallback(
            SCHEMAS,
            {
                "kl_penalty": _kl_torch,
                "shape_rewards": _shape_rewards_torch,
                "gae": _gae_torch,
                "masked_moments": _moments_torch,
                "masked_whiten_apply": _apply_torch,
            },
        )
    for name, fake, cuda in (
        ("kl_penalty", _kl_fake, _kl_cuda),
        ("shape_rewards", _shape_rewards_fake, _shape_rewards_cuda),
        ("gae", _gae_fake, _gae_cuda),
        ("masked_moments", _moments_fake, _moments_cuda),
        ("masked_whiten_apply", _apply_fake, _apply_cuda),
    ):
        torch.library.register_fake(f"rlhf_fast::{name}")(fake)
        torch.library.register_kernel(f"rlhf_fast::{name}", "cuda", cuda)
    torch.library.register_autograd("rlhf_fast::kl_penalty", _kl_backward, setup_context=_kl_setup_context)


_register()


# ---- public API ------------------------------------------------------------------------------

def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (B, T) (a view when the leading dims allow it; works for empty tensors too)."""
    if x.dim() == 2:
        return x  # already (B, T): no reshape call on the fast path
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, estimator: str = "k1", clamp: float | None = None
) -> torch.Tensor:
    """Per-token KL penalty, float32, with d = logprobs - ref_logprobs:
    k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 (Schulman 2020, "Approximating KL Divergence").

    Args:
        logprobs, ref_logprobs: same shape, floating (any of float32 / bfloat16 / float16 / float64).
        estimator: "k1" (TRL, N+ details), "k2", or "k3" (an unbiased, non-negative estimator).
        clamp: if given, the result is clamped to [-clamp, clamp] (verl and OpenRLHF clamp at 10;
            k3 overflows to inf for d < -88 otherwise, verl #891). No clamping by default.
    Returns:
        float32, the inputs' shape. Differentiable w.r.t. logprobs (and ref_logprobs).
    """
    estimator, clamp = C.check_kl_inputs(logprobs, ref_logprobs, estimator, clamp)
    return torch.ops.rlhf_fast.kl_penalty(logprobs, ref_logprobs, estimator, clamp)


def shape_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: str = "k1",
    clamp: float | None = None,
):
    """Per-token rewards for PPO: ``-kl_coef * kl`` on valid tokens plus the sequence score at the
    last valid token of each row (N-details #17; the score lands *on* the last valid token, not at
    ``sequence_length + 1`` as in TRL #3750).

    Args:
        scores: (...) floating, one score per row (finite).
        logprobs, ref_logprobs: (..., T) floating; masked positions may hold any padding.
        mask: (..., T) bool or 0/1; a row with no valid token gets all-zero rewards (its score is dropped).
        kl_coef: finite (beta); estimator, clamp: as in ``kl_penalty``.
    Returns:
        ``(rewards, kl)``, both (..., T) float32, 0 at masked positions. Not differentiable.
    """
    # The C++ CPU kernel checks the scores and kl for finiteness while it runs (a ValueError), which
    # at [64, 512] costs less than the two separate reductions it replaces (issue 23); the Triton
    # kernels and the reference fallback leave it to the checks here.
    kernel_checks = logprobs.device.type == "cpu" and _library.extension_loaded()
    mask, kl_coef, estimator, clamp = C.check_shape_rewards_inputs(
        scores, logprobs, ref_logprobs, mask, kl_coef, estimator, clamp, check_finite=not kernel_checks
    )
    shape = logprobs.shape
    try:
        rewards, kl = torch.ops.rlhf_fast.shape_rewards(
            scores.detach().reshape(-1), _rows(logprobs.detach()), _rows(ref_logprobs.detach()), _rows(mask),
            kl_coef, estimator, clamp,
        )
    except ValueError:
        if not kernel_checks:
            raise
        # The kernel found a non-finite score, or a non-finite log-prob on a valid token where kl
        # is not finite: the same scans as the checks below name the argument, the row and the token.
        C.check_finite_rows("scores", scores)
        C.check_finite_rows("logprobs", logprobs, mask)
        C.check_finite_rows("ref_logprobs", ref_logprobs, mask)
        raise
    if not kernel_checks:
        C.check_finite_rows("scores", scores)
        C.check_shape_rewards_outputs(kl, logprobs, ref_logprobs, mask)
    if rewards.shape != shape:
        rewards, kl = rewards.reshape(shape), kl.reshape(shape)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float, lam: float):
    """Generalised advantage estimation over the valid tokens of each row.

    From the end of the row: ``delta_t = r_t + gamma * V_next - V_t``,
    ``A_t = delta_t + gamma * lam * A_next``, where V_next and A_next are those of the next *valid*
    token (0 after the last one): masked tokens (right padding, or observation tokens inside a
    multi-turn response) are skipped and the carries pass through them, as in verl's masked GAE.
    For right-padded masks this equals TRL's ``for t in reversed(range(T))`` loop.

    Args:
        rewards, values: (..., T) floating, finite on valid tokens.
        mask: (..., T) bool or 0/1.
        gamma, lam: in [0, 1].
    Returns:
        ``(advantages, returns)``, both (..., T) float32; ``returns = advantages + values`` on valid
        tokens, both 0 at masked positions. Not differentiable (inputs are detached).
    """
    mask, gamma, lam = C.check_gae_inputs(rewards, values, mask, gamma, lam, check_finite=False)
    shape = rewards.shape
    # As in shape_rewards: the C++ CPU kernel checks rewards and values on valid tokens while it
    # runs (ValueError); elsewhere one reduction over the returns does (check_gae_outputs).
    kernel_checks = rewards.device.type == "cpu" and _library.extension_loaded()
    try:
        adv, ret = torch.ops.rlhf_fast.gae(_rows(rewards.detach()), _rows(values.detach()), _rows(mask), gamma, lam)
    except ValueError:
        if not kernel_checks:
            raise
        C.check_finite_rows("rewards", rewards, mask)  # names the argument, the row and the token
        C.check_finite_rows("values", values, mask)
        raise
    if not kernel_checks:
        C.check_gae_outputs(ret, rewards, values, mask)
    if adv.shape != shape:
        adv, ret = adv.reshape(shape), ret.reshape(shape)
    return adv, ret


def _global_moments(x: torch.Tensor, mask: torch.Tensor, group) -> torch.Tensor:
    """float64 (count, mean, M2) over the valid entries of x on every rank of ``group``."""
    stats = torch.ops.rlhf_fast.masked_moments(x.detach(), mask)
    if group is None:
        return stats
    import torch.distributed as dist

    # One collective: the sums (n, n * mean, M2 + n * mean^2) add across ranks. Each rank's M2 is
    # exact (centred on its own mean); only the between-rank term cancels, in float64.
    n, mean, m2 = stats.unbind()
    packed = torch.stack([n, n * mean, m2 + n * mean * mean])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    n, s, q = packed.unbind()
    mean = torch.where(n > 0, s / n.clamp(min=1.0), 0.0)
    m2 = (q - n * mean * mean).clamp(min=0.0)
    return torch.stack([n, mean, m2])


def masked_mean(x: torch.Tensor, mask: torch.Tensor, *, group=None) -> torch.Tensor:
    """Mean of the valid entries of x (over all ranks of ``group``), a float32 scalar; 0 if none."""
    mask, _ = C.check_whiten_inputs(x, mask)
    return _global_moments(x, mask, group)[1].float()


def masked_var(x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True, group=None) -> torch.Tensor:
    """Variance of the valid entries of x (over all ranks of ``group``), a float32 scalar. Divides
    by n - 1 when ``unbiased`` (``torch.var``, TRL, verl) or by n (TF, lm-human-preferences,
    N-details #18; OpenRLHF). Too few entries (none, or one when unbiased) give 0, not NaN."""
    mask, _ = C.check_whiten_inputs(x, mask)
    n, _, m2 = _global_moments(x, mask, group).unbind()
    return (m2 / (n - (1.0 if unbiased else 0.0)).clamp(min=1.0)).float()


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    group=None,
) -> torch.Tensor:
    """``(x - mean) * rsqrt(var + eps)`` on valid entries, 0 on masked ones, float32.

    ``shift_mean=False`` adds the mean back (rewards are whitened that way, advantages with the
    shift: N-details #18). With ``group`` (a torch.distributed process group) mean and variance are
    over the valid entries of all ranks (OpenRLHF's global whitening). Two passes over x.
    Not differentiable (x is detached).
    """
    mask, eps = C.check_whiten_inputs(x, mask, eps)
    x = x.detach()
    stats = _global_moments(x, mask, group)
    return torch.ops.rlhf_fast.masked_whiten_apply(x, mask, stats, bool(shift_mean), bool(unbiased), eps)
