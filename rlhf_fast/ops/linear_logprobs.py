"""``linear_logprobs``: token log-probs (+ entropy) straight from hidden states, logits never stored.

``torch.ops.rlhf_fast.linear_logprobs(hidden (N, H), weight (V, H), labels (N,), temperature,
return_entropy, ignore_index) -> (logprobs, entropy, row_stats)``, float32 (N,), (N,) and (N, 2)
(the row max and log-sum-exp minus it, as ``gather_logprobs`` saves them), equals
``gather_logprobs(hidden @ weight.T, labels, ...)`` without an [N, V] tensor:

- CUDA: Triton kernels (kernels/linear_logprobs.py) that keep logits tiles on chip, forward and
  backward.
- CPU (and float64 on CUDA): chunked torch. Rows are processed ``_row_chunk`` at a time: one
  matmul writes a [rows, V] float32 logits chunk (MKL / oneDNN GEMM: the fastest matmul on a CPU,
  which is why this is not a hand-written C++ loop), the C++ ``gather_logprobs`` kernel reduces it
  in one pass, and the next chunk overwrites the same buffer. The backward recomputes the chunk,
  turns it into d(logits) with ``gather_logprobs_backward`` and contracts it with two GEMMs into
  d(hidden) and a float32 d(weight) accumulator. Extra memory: the forward one [rows, V] float32
  buffer (``CPU_CHUNK_BYTES``), the backward two (logits and d(logits)) plus the [V, H] float32
  accumulator — never [N, V]. Half-precision weights are upcast VOCAB_SLICE rows at a time, so no
  float32 copy of the whole weight is made either.

Autograd runs ``linear_logprobs_backward`` (one more custom op, so torch.compile sees both); fake
kernels let torch.compile trace them.

The sampling filter (top-k / top-p) enters as a cut per row (``rlhf_fast/_filter.py``), found by
the public function in a pre-pass that forms the logits ``_row_chunk`` rows at a time (one more
GEMM over the rows; the engine's rule needs every logit of a row before the set is known). A call
that builds no graph skips the pre-pass: each chunk's cut is found on the logits the kernel then
reduces (``_fwd_filtered_one_pass``, the same bits). The
forward and backward recompute each chunk with the same GEMM on the same rows, so the kernels
compare the cut against the very logits it was found on. With a cut, CUDA also takes the chunked
path (the Triton ``gather_logprobs`` kernel on each stored chunk), not the fused Triton kernel:
its on-chip tile logits differ from a torch GEMM's by rounding, and the cut's own token (whose
logit *is* the cut) could then fall on the wrong side of it.
"""

from __future__ import annotations

import torch

from rlhf_fast import _checks, _filter
from rlhf_fast.ops import logprobs as _logprobs  # noqa: F401  (registers rlhf_fast::gather_logprobs)

SCHEMAS = {
    "linear_logprobs": (
        "linear_logprobs(Tensor hidden, Tensor weight, Tensor labels, float temperature=1.0, "
        "bool return_entropy=False, int ignore_index=-100, Tensor? cut_value=None, "
        "Tensor? cut_index=None) -> (Tensor, Tensor, Tensor)"
    ),
    "linear_logprobs_backward": (
        "linear_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, "
        "Tensor weight, Tensor labels, Tensor row_stats, Tensor entropy, float temperature, "
        "int ignore_index, Tensor? cut_value=None, Tensor? cut_index=None, bool weight_grad=True) -> (Tensor, Tensor)"
    ),
}

# Bytes of one [rows, V] float32 logits chunk on the CPU path. 32 MiB: large enough that the GEMMs
# run at full speed (>= 256 rows for V = 32k), small enough to stay a fraction of a materialised
# [N, V] for any N worth chunking. Module-level so callers and tests can change it.
CPU_CHUNK_BYTES = 32 << 20
# Rows per CPU chunk at least (never more than the call has): at V = 151,936 the 32 MiB budget gives
# 55 rows, and a float32 GEMM of 55 rows re-reads the whole (V, H) weight per 55 rows: 31 GFLOP/s vs
# 68 at 256 rows, and the op 1.2-1.5x slower than the stored-logits path (issue 35, H = 896, one
# thread, AMD EPYC Zen 5). 128 rows reach the unchunked GEMM's rate; the chunk is then
# 128 x V x 4 bytes (78 MB at V = 151,936), still independent of the number of tokens.
CPU_MIN_ROWS = 128
# Rows of a half-precision weight upcast to float32 at a time on the CPU path.
VOCAB_SLICE = 4096


def _row_chunk(n_rows: int, vocab: int, chunk_bytes: int | None = None, min_rows: int | None = None) -> int:
    """Rows per CPU chunk: as many as fit ``chunk_bytes`` of float32 logits, at least ``min_rows``
    (``CPU_MIN_ROWS``) and 1, at most ``n_rows``."""
    budget = CPU_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    floor = CPU_MIN_ROWS if min_rows is None else min_rows
    return max(1, min(n_rows, max(floor, budget // (4 * max(vocab, 1)))))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _vocab_slices(weight: torch.Tensor):
    """(start, weight slice in the compute dtype): the whole weight when no upcast is needed."""
    cd = _compute_dtype(weight.dtype)
    if weight.dtype == cd:
        yield 0, weight
        return
    for v0 in range(0, weight.shape[0], VOCAB_SLICE):
        yield v0, weight[v0 : v0 + VOCAB_SLICE].to(cd)


def _logits_chunk(h: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """h: (rows, H) in the compute dtype -> ``out``: (rows, V) logits in the compute dtype.

    ``out`` is one buffer reused by every chunk of a call: a fresh [rows, V] allocation per chunk
    would be served by mmap and page-faulted in again each time (glibc maps blocks > 32 MiB
    afresh), which costs about as much as the matmul at H = 256."""
    if weight.dtype == h.dtype:
        return torch.mm(h, weight.T, out=out)
    for v0, w in _vocab_slices(weight):
        out[:, v0 : v0 + w.shape[0]] = h @ w.T  # a [rows, VOCAB_SLICE] temporary
    return out


# ---- CPU (and float64): chunked torch ------------------------------------------------------------
# The kernels are below autograd (the op's own backward is registered), so no graph is built here;
# no_grad also lets the backward's out= / in-place GEMMs run when opcheck feeds inputs that
# require grad straight to linear_logprobs_backward.

@torch.no_grad()
def _fwd_chunked(hidden, weight, labels, temperature=1.0, return_entropy=False, ignore_index=-100, cut_value=None,
                 cut_index=None):
    N = hidden.shape[0]
    opts = dict(dtype=torch.float32, device=hidden.device)
    lp, ent, stats = torch.empty(N, **opts), torch.empty(N, **opts), torch.empty((N, 2), **opts)
    cd = _compute_dtype(hidden.dtype)
    rows = _row_chunk(N, weight.shape[0])
    buf = torch.empty((rows, weight.shape[0]), dtype=cd, device=hidden.device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        z = _logits_chunk(hidden[r0:r1].to(cd), weight, buf[: r1 - r0])
        out = torch.ops.rlhf_fast.gather_logprobs(
            z.unsqueeze(0), labels[r0:r1].unsqueeze(0), temperature, return_entropy, ignore_index,
            *_cut_rows(cut_value, cut_index, r0, r1),
        )
        for dst, src in zip((lp, ent, stats), out):
            dst[r0:r1] = src[0]
    return lp, ent, stats


@torch.no_grad()
def _cut_rows(cut_value, cut_index, r0, r1):
    """The (1, rows) cut of rows r0:r1 for the gather kernel, or (None, None)."""
    if cut_value is None:
        return None, None
    return cut_value[r0:r1].unsqueeze(0), cut_index[r0:r1].unsqueeze(0)


@torch.no_grad()
def _cut(hidden, weight, temperature, top_k, top_p):
    """The engine's kept set of every row of ``hidden @ weight.T`` as a cut ((N,) float32, (N,)
    int64), found ``_row_chunk`` rows at a time from the same logits the kernels form; None when
    the filter keeps everything."""
    N, V = hidden.shape[0], weight.shape[0]
    if not _filter.filter_active(top_k, top_p, V):
        return None
    cd = _compute_dtype(hidden.dtype)
    value = torch.empty(N, dtype=torch.float32, device=hidden.device)
    index = torch.empty(N, dtype=torch.int64, device=hidden.device)
    rows = _row_chunk(N, V)
    buf = torch.empty((rows, V), dtype=cd, device=hidden.device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        z = _logits_chunk(hidden[r0:r1].to(cd), weight, buf[: r1 - r0])
        value[r0:r1], index[r0:r1] = _filter.kept_cut(z, temperature, top_k, top_p)
    return value, index


@torch.no_grad()
def _fwd_filtered_one_pass(hidden, weight, labels, temperature, return_entropy, ignore_index, top_k, top_p):
    """(logprobs, entropy) (N,) float32 under the filter for a call that builds no graph (the
    old-log-prob and reference passes): each chunk's logits are formed once, its rows' cut found on
    them and the kernel run on them, where ``_cut`` + the op form every chunk twice (issue 35: the
    pre-pass doubled the GEMM). Same chunks, same GEMM, same cut: the same bits as that route, so
    a micro-batch's scoring pass and its update forward still agree exactly."""
    N, V = hidden.shape[0], weight.shape[0]
    opts = dict(dtype=torch.float32, device=hidden.device)
    lp, ent = torch.empty(N, **opts), torch.empty(N, **opts)
    cd = _compute_dtype(hidden.dtype)
    rows = _row_chunk(N, V)
    buf = torch.empty((rows, V), dtype=cd, device=hidden.device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        z = _logits_chunk(hidden[r0:r1].to(cd), weight, buf[: r1 - r0])
        value, index = _filter.kept_cut(z, temperature, top_k, top_p)
        out = torch.ops.rlhf_fast.gather_logprobs(
            z.unsqueeze(0), labels[r0:r1].unsqueeze(0), temperature, return_entropy, ignore_index,
            value.unsqueeze(0), index.unsqueeze(0),
        )
        lp[r0:r1], ent[r0:r1] = out[0][0], out[1][0]
    return lp, ent


def _builds_graph(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@torch.no_grad()
def _bwd_chunked(grad_logprobs, grad_entropy, hidden, weight, labels, row_stats, entropy, temperature, ignore_index,
                 cut_value=None, cut_index=None, weight_grad=True):
    """(d_hidden, d_weight); without ``weight_grad`` (a frozen LM head, as under LoRA) d_weight is an
    empty tensor and neither its (V, H) float32 accumulator nor its GEMMs exist (issue 35: +466 MB
    at Qwen2-0.5B's head)."""
    N, V = hidden.shape[0], weight.shape[0]
    cd = _compute_dtype(hidden.dtype)
    dh = torch.empty(hidden.shape, dtype=cd, device=hidden.device)
    # float32 accumulator over chunks
    dw = torch.zeros(weight.shape if weight_grad else (0,), dtype=cd, device=hidden.device)
    glp = grad_logprobs.to(torch.float32)
    gh = grad_entropy.to(torch.float32) if grad_entropy is not None else None
    rows = _row_chunk(N, V)
    buf = torch.empty((rows, V), dtype=cd, device=hidden.device)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h = hidden[r0:r1].to(cd)
        z = _logits_chunk(h, weight, buf[: r1 - r0])
        dz = torch.ops.rlhf_fast.gather_logprobs_backward(
            glp[r0:r1].unsqueeze(0), None if gh is None else gh[r0:r1].unsqueeze(0), z.unsqueeze(0),
            labels[r0:r1].unsqueeze(0), row_stats[r0:r1].unsqueeze(0), entropy[r0:r1].unsqueeze(0),
            temperature, ignore_index, *_cut_rows(cut_value, cut_index, r0, r1),
        )[0]
        if weight.dtype == cd:
            torch.mm(dz, weight, out=dh[r0:r1])
            if weight_grad:
                dw.addmm_(dz.T, h)
        else:
            dh[r0:r1].zero_()
            for v0, w in _vocab_slices(weight):
                d = dz[:, v0 : v0 + w.shape[0]]
                dh[r0:r1].addmm_(d, w)
                if weight_grad:
                    dw[v0 : v0 + w.shape[0]].addmm_(d.T, h)
        del dz
    return dh.to(hidden.dtype), dw.to(weight.dtype)


# ---- CUDA: Triton ---------------------------------------------------------------------------------

def _fwd_cuda(hidden, weight, labels, temperature=1.0, return_entropy=False, ignore_index=-100, cut_value=None,
              cut_index=None):
    # tensor cores have no float64 path worth a kernel; the fused kernel has no filtered variant
    if hidden.dtype == torch.float64 or cut_value is not None:
        return _fwd_chunked(hidden, weight, labels, temperature, return_entropy, ignore_index, cut_value, cut_index)
    from rlhf_fast.kernels.linear_logprobs import linear_logprobs_fwd

    return linear_logprobs_fwd(hidden, weight, labels, temperature, return_entropy, ignore_index)


def _bwd_cuda(grad_logprobs, grad_entropy, hidden, weight, labels, row_stats, entropy, temperature, ignore_index,
              cut_value=None, cut_index=None, weight_grad=True):
    args = (grad_logprobs, grad_entropy, hidden, weight, labels, row_stats, entropy, temperature, ignore_index)
    if hidden.dtype == torch.float64 or cut_value is not None:
        return _bwd_chunked(*args, cut_value, cut_index, weight_grad)
    from rlhf_fast.kernels.linear_logprobs import linear_logprobs_bwd

    dh, dw = linear_logprobs_bwd(*args)  # the fused kernel writes both (its d_weight is dropped when frozen)
    return dh, (dw if weight_grad else dw.new_empty(0))


# ---- fake (meta) kernels, autograd ----------------------------------------------------------------

def _fwd_fake(hidden, weight, labels, temperature=1.0, return_entropy=False, ignore_index=-100, cut_value=None,
              cut_index=None):
    lead = hidden.shape[:-1]
    f32 = torch.float32
    return hidden.new_empty(lead, dtype=f32), hidden.new_empty(lead, dtype=f32), hidden.new_empty((*lead, 2), dtype=f32)


def _bwd_fake(grad_logprobs, grad_entropy, hidden, weight, labels, row_stats, entropy, temperature, ignore_index,
              cut_value=None, cut_index=None, weight_grad=True):
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_grad else weight.new_empty(0)
    return torch.empty_like(hidden, memory_format=torch.contiguous_format), dw


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, temperature, return_entropy, ignore_index, cut_value, cut_index = inputs
    _, entropy, row_stats = output
    ctx.save_for_backward(hidden, weight, labels, row_stats, entropy, cut_value, cut_index)
    ctx.temperature, ctx.return_entropy, ctx.ignore_index = temperature, return_entropy, ignore_index
    ctx.mark_non_differentiable(row_stats)


def _backward(ctx, grad_logprobs, grad_entropy, _grad_stats):
    hidden, weight, labels, row_stats, entropy, cut_value, cut_index = ctx.saved_tensors
    if grad_logprobs is None:
        grad_logprobs = torch.zeros_like(entropy)
    if not ctx.return_entropy:
        grad_entropy = None  # entropy was not computed: it is a constant zero
    weight_grad = bool(ctx.needs_input_grad[1])
    dh, dw = torch.ops.rlhf_fast.linear_logprobs_backward(
        grad_logprobs, grad_entropy, hidden, weight, labels, row_stats, entropy, ctx.temperature, ctx.ignore_index,
        cut_value, cut_index, weight_grad,
    )
    return dh, (dw if weight_grad else None), None, None, None, None, None, None


_LIB = torch.library.Library("rlhf_fast", "FRAGMENT")


def _register() -> None:
    for name, schema in SCHEMAS.items():
        _LIB.define(schema)
    torch.library.register_kernel("rlhf_fast::linear_logprobs", "cpu", _fwd_chunked, lib=_LIB)
    torch.library.register_kernel("rlhf_fast::linear_logprobs_backward", "cpu", _bwd_chunked, lib=_LIB)
    torch.library.register_kernel("rlhf_fast::linear_logprobs", "cuda", _fwd_cuda, lib=_LIB)
    torch.library.register_kernel("rlhf_fast::linear_logprobs_backward", "cuda", _bwd_cuda, lib=_LIB)
    torch.library.register_fake("rlhf_fast::linear_logprobs", lib=_LIB)(_fwd_fake)
    torch.library.register_fake("rlhf_fast::linear_logprobs_backward", lib=_LIB)(_bwd_fake)
    torch.library.register_autograd(
        "rlhf_fast::linear_logprobs", _backward, setup_context=_setup_context, lib=_LIB
    )


_register()


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """Log-prob of each label under ``softmax(hidden @ weight.T / temperature)``, float32, without
    ever storing the [..., V] logits; with a sampling filter, under the softmax renormalised over
    the kept tokens (as ``gather_logprobs``).

    Args:
        hidden: (..., H) float32 / bfloat16 / float16 / float64, e.g. the final hidden states.
        weight: (V, H), the lm_head weight, same dtype and device as ``hidden``.
        labels: (...) integer, in [0, V) or equal to ``ignore_index`` (log-prob 0, no gradient).
        temperature: > 0; logits are divided by it (N-details #10: use the sampling temperature).
        return_entropy: also return the entropy of ``softmax(hidden @ weight.T / temperature)``
            (of the filtered distribution when a filter is on).
        top_k, top_p: the engine's sampling filter (0 / 1.0 = off; see ``gather_logprobs``): the
            kept set is a constant of the forward, gradients flow through kept logits only, a
            label outside it gets -inf. Off: bit-identical to the unfiltered op.
    Returns:
        logprobs (...) float32, and entropy (...) float32 if ``return_entropy``. Differentiable
        w.r.t. hidden and weight through both.
    Raises:
        ValueError naming the argument: non-floating hidden or weight, mismatched dtypes, weight
        not (V, H) with H = hidden.shape[-1], labels of the wrong shape or out of range, a device
        mismatch, temperature <= 0 or not finite, top_k not an int >= 0, top_p outside (0, 1].
    """
    temperature = _checks.check_linear_logprob_inputs(hidden, weight, labels, temperature, ignore_index)
    top_k, top_p = _filter.check_filter(top_k, top_p)
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).long()
    if (_filter.filter_active(top_k, top_p, weight.shape[0]) and not _builds_graph(h, weight)
            and not torch.compiler.is_compiling()):
        lp, ent = _fwd_filtered_one_pass(h, weight, y, temperature, bool(return_entropy), int(ignore_index),
                                         top_k, top_p)
        return (lp.reshape(lead), ent.reshape(lead)) if return_entropy else lp.reshape(lead)
    cut = _cut(h.detach(), weight.detach(), temperature, top_k, top_p)
    cut_value, cut_index = cut if cut is not None else (None, None)
    lp, ent, _ = torch.ops.rlhf_fast.linear_logprobs(
        h, weight, y, temperature, bool(return_entropy), int(ignore_index), cut_value, cut_index
    )
    if return_entropy:
        return lp.reshape(lead), ent.reshape(lead)
    return lp.reshape(lead)
