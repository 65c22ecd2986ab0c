"""``gather_logprobs``: token log-probs (+ entropy) from logits, as one fused custom op.

``torch.ops.rlhf_fast.gather_logprobs(logits (B, T, V), labels (B, T), temperature, return_entropy,
ignore_index, cut_value, cut_index) -> (logprobs, entropy, row_stats)``, float32 (B, T), (B, T) and
(B, T, 2) (the row max and log-sum-exp minus it, saved for the backward), dispatches to the C++ kernel on
CPU (csrc/logprobs.cpp) and the Triton kernel on CUDA (kernels/logprobs.py); a fake kernel lets
torch.compile trace it; autograd runs ``gather_logprobs_backward``, one pass writing d(logits).

The sampling filter (top-k / top-p) enters as an optional cut per row (``rlhf_fast/_filter.py``):
the kernels sum over the kept tokens only. With a filter the public function calls
``torch.ops.rlhf_fast.gather_logprobs_filtered(logits, labels, temperature, return_entropy,
ignore_index, top_k, top_p) -> (logprobs, entropy, row_stats, cut_value, cut_index)``, which finds
the cut with the sampler's own rule and sums the kept set in the same passes (csrc/logprobs_filtered.cpp
on CPU; elsewhere ``kept_cut`` then ``gather_logprobs`` with its cut); its backward is
``gather_logprobs_backward`` with that cut.
"""

from __future__ import annotations

import torch

from rlhf_fast import _checks, _filter
from rlhf_fast.ops import _library

# Mirrors TORCH_LIBRARY_FRAGMENT in csrc/logprobs.cpp (used only when the C++ library cannot be
# built); a test checks the two agree.
SCHEMAS = {
    "gather_logprobs": (
        "gather_logprobs(Tensor logits, Tensor labels, float temperature=1.0, "
        "bool return_entropy=False, int ignore_index=-100, Tensor? cut_value=None, "
        "Tensor? cut_index=None) -> (Tensor, Tensor, Tensor)"
    ),
    "gather_logprobs_backward": (
        "gather_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor logits, "
        "Tensor labels, Tensor row_stats, Tensor entropy, float temperature, int ignore_index, "
        "Tensor? cut_value=None, Tensor? cut_index=None) -> Tensor"
    ),
    "gather_logprobs_filtered": (
        "gather_logprobs_filtered(Tensor logits, Tensor labels, float temperature, bool return_entropy, "
        "int ignore_index, int top_k, float top_p) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
}


# ---- CPU fallback (no compiler): plain torch, materialises [B, T, V] -------------------------

def _kept(logits, temperature, cut_value, cut_index):
    """(B, T, V) kept mask of the cut, or None without one."""
    if cut_value is None:
        return None
    return _filter.kept_mask(_filter.scaled_logits(logits, temperature), cut_value, cut_index)


def _fwd_torch(logits, labels, temperature=1.0, return_entropy=False, ignore_index=-100, cut_value=None,
               cut_index=None):
    z = logits.float() / temperature
    m = z.amax(-1, keepdim=True)
    kept = _kept(logits, temperature, cut_value, cut_index)
    if kept is not None:
        z = z.masked_fill(~kept, float("-inf"))
    logp = torch.log_softmax(z, -1)
    stats = torch.cat([m, torch.logsumexp(z - m, -1, keepdim=True)], -1)
    ignored = labels == ignore_index
    lp = logp.gather(-1, labels.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    lp = torch.where(ignored, 0.0, lp)
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, 0.0)).sum(-1) if return_entropy else torch.zeros_like(lp)
    return lp, ent, stats


def _bwd_torch(grad_logprobs, grad_entropy, logits, labels, row_stats, entropy, temperature, ignore_index,
               cut_value=None, cut_index=None):
    logp = (logits.float() / temperature - row_stats[..., :1]) - row_stats[..., 1:]
    p = torch.exp(logp)
    has_label = labels != ignore_index
    kept = _kept(logits, temperature, cut_value, cut_index)
    if kept is not None:
        p = torch.where(kept, p, 0.0)
        label_kept = kept.gather(-1, labels.clamp(0, logits.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        has_label = has_label & label_kept
    g = torch.where(has_label, grad_logprobs.float(), 0.0).unsqueeze(-1)
    onehot = torch.zeros_like(p).scatter_(-1, labels.clamp(min=0).unsqueeze(-1), 1.0)
    dz = g * (onehot - p)
    if grad_entropy is not None:
        term = torch.where(p > 0, p * (logp + entropy.unsqueeze(-1)), 0.0)
        dz = dz - grad_entropy.float().unsqueeze(-1) * term
    return (dz / temperature).to(logits.dtype)


# ---- CUDA: Triton ----------------------------------------------------------------------------

def _fwd_cuda(logits, labels, temperature=1.0, return_entropy=False, ignore_index=-100, cut_value=None,
              cut_index=None):
    from rlhf_fast.kernels.logprobs import gather_logprobs_fwd

    return gather_logprobs_fwd(logits, labels, temperature, return_entropy, ignore_index, cut_value, cut_index)


def _bwd_cuda(grad_logprobs, grad_entropy, logits, labels, row_stats, entropy, temperature, ignore_index,
              cut_value=None, cut_index=None):
    from rlhf_fast.kernels.logprobs import gather_logprobs_bwd

    return gather_logprobs_bwd(grad_logprobs, grad_entropy, logits, labels, row_stats, entropy, temperature, ignore_index,
                               cut_value, cut_index)


# ---- the filtered op where no fused kernel exists: the cut, then the op with it ------------

def _filtered_composite(logits, labels, temperature, return_entropy, ignore_index, top_k, top_p):
    """``gather_logprobs_filtered`` as kept_cut + gather_logprobs (CUDA, and CPU without the C++
    library); a disabled filter gives the "no cut" the C++ kernel returns (-inf, V - 1)."""
    cut = _filter.kept_cut(logits, temperature, top_k, top_p)
    if cut is None:
        V = logits.shape[-1]
        cut = (torch.full(labels.shape, float("-inf"), device=logits.device),
               torch.full(labels.shape, V - 1, dtype=torch.int64, device=logits.device))
    lp, ent, stats = torch.ops.rlhf_fast.gather_logprobs(logits, labels, temperature, return_entropy, ignore_index,
                                                         cut[0], cut[1])
    return lp, ent, stats, cut[0], cut[1]


# ---- fake (meta) kernels, autograd -----------------------------------------------------------

def _fwd_fake(logits, labels, temperature=1.0, return_entropy=False, ignore_index=-100, cut_value=None,
              cut_index=None):
    shape = logits.shape[:-1]
    return (
        logits.new_empty(shape, dtype=torch.float32),
        logits.new_empty(shape, dtype=torch.float32),
        logits.new_empty((*shape, 2), dtype=torch.float32),
    )


def _bwd_fake(grad_logprobs, grad_entropy, logits, labels, row_stats, entropy, temperature, ignore_index,
              cut_value=None, cut_index=None):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _filtered_fake(logits, labels, temperature, return_entropy, ignore_index, top_k, top_p):
    lp, ent, stats = _fwd_fake(logits, labels)
    return lp, ent, stats, lp.new_empty(lp.shape), lp.new_empty(lp.shape, dtype=torch.int64)


def _setup_context_filtered(ctx, inputs, output):
    logits, labels, temperature, return_entropy, ignore_index, _top_k, _top_p = inputs
    _, entropy, row_stats, cut_value, cut_index = output
    ctx.save_for_backward(logits, labels, row_stats, entropy, cut_value, cut_index)
    ctx.temperature, ctx.return_entropy, ctx.ignore_index = temperature, return_entropy, ignore_index
    ctx.mark_non_differentiable(row_stats, cut_value, cut_index)


def _backward_filtered(ctx, grad_logprobs, grad_entropy, _grad_stats, _grad_cut_value, _grad_cut_index):
    return _backward(ctx, grad_logprobs, grad_entropy, None)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, return_entropy, ignore_index, cut_value, cut_index = inputs
    _, entropy, row_stats = output
    ctx.save_for_backward(logits, labels, row_stats, entropy, cut_value, cut_index)
    ctx.temperature, ctx.return_entropy, ctx.ignore_index = temperature, return_entropy, ignore_index
    ctx.mark_non_differentiable(row_stats)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_stats):
    logits, labels, row_stats, entropy, cut_value, cut_index = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(entropy)
    if not ctx.return_entropy:
        grad_entropy = None  # entropy was not computed: it is a constant zero
    dlogits = torch.ops.rlhf_fast.gather_logprobs_backward(
        grad_logprobs, grad_entropy, logits, labels, row_stats, entropy, ctx.temperature, ctx.ignore_index,
        cut_value, cut_index,
    )
    return dlogits, None, None, None, None, None, None


def _register() -> None:
    if not _library.load_extension():
        _library.define_fallback(
            SCHEMAS, {"gather_logprobs": _fwd_torch, "gather_logprobs_backward": _bwd_torch,
                      "gather_logprobs_filtered": _filtered_composite}
        )
    torch.library.register_fake("rlhf_fast::gather_logprobs")(_fwd_fake)
    torch.library.register_fake("rlhf_fast::gather_logprobs_backward")(_bwd_fake)
    torch.library.register_kernel("rlhf_fast::gather_logprobs", "cuda", _fwd_cuda)
    torch.library.register_kernel("rlhf_fast::gather_logprobs_backward", "cuda", _bwd_cuda)
    torch.library.register_autograd("rlhf_fast::gather_logprobs", _backward, setup_context=_setup_context)
    torch.library.register_fake("rlhf_fast::gather_logprobs_filtered")(_filtered_fake)
    torch.library.register_kernel("rlhf_fast::gather_logprobs_filtered", "cuda", _filtered_composite)
    torch.library.register_autograd("rlhf_fast::gather_logprobs_filtered", _backward_filtered,
                                    setup_context=_setup_context_filtered)


_register()


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (B, T, V) without copying when the leading dims allow a view."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() == 3:
        return x
    return x.flatten(0, -3)  # copies only if the leading dims cannot be merged


def gather_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """Log-prob of each label under ``softmax(logits / temperature)``, fused, float32; with a
    sampling filter, under the softmax renormalised over the tokens the filter keeps.

    Args:
        logits: (..., V) float32 / bfloat16 / float16 / float64, any strides (a unit stride along
            V avoids a copy; slices like ``logits[:, :-1]`` are read in place).
        labels: (...) integer, in [0, V) or equal to ``ignore_index`` (log-prob 0, no gradient).
        temperature: > 0; logits are divided by it (N-details #10: use the sampling temperature).
        return_entropy: also return the entropy of ``softmax(logits / temperature)`` (of the
            filtered distribution when a filter is on).
        top_k, top_p: the sampling filter of ``rlhf_fast.engine.SamplingParams`` (0 / 1.0 = off),
            applied after the temperature with the engine's rule (``rlhf_fast/_filter.py``: top-k
            keeps ties with the k-th logit, top-p's stable sort breaks ties towards lower ids), so
            these are the log-probs the engine samples with. The kept set is a constant of the
            forward: gradients flow through kept logits only. A label outside it gets -inf.
            Off (the defaults, or top_k >= V): bit-identical to the unfiltered op.
    Returns:
        logprobs (...) float32, and entropy (...) float32 if ``return_entropy``. Differentiable
        w.r.t. logits through both; no [..., V] float32 temporary is ever created on CPU (the
        torch cut of CUDA / no C++ library works on ``_filter.CUT_CHUNK_BYTES`` of rows at a time).
    Raises:
        ValueError naming the argument: non-floating logits, integer labels of the wrong shape or
        out of range, a device mismatch, temperature <= 0 or not finite, top_k not an int >= 0,
        top_p outside (0, 1].
    """
    temperature = _checks.check_logprob_inputs(logits, labels, temperature, ignore_index)
    top_k, top_p = _filter.check_filter(top_k, top_p)
    lead = logits.shape[:-1]
    x = _as_3d(logits)
    y = labels.reshape(x.shape[:-1]).long()
    if _filter.filter_active(top_k, top_p, x.shape[-1]):
        # the cut and the sums in one op (csrc/logprobs_filtered.cpp on CPU)
        lp, ent, *_ = torch.ops.rlhf_fast.gather_logprobs_filtered(x, y, temperature, bool(return_entropy),
                                                                   int(ignore_index), top_k, top_p)
    else:
        lp, ent, _ = torch.ops.rlhf_fast.gather_logprobs(x, y, temperature, bool(return_entropy), int(ignore_index))
    if return_entropy:
        return lp.reshape(lead), ent.reshape(lead)
    return lp.reshape(lead)
