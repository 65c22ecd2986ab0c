"""Token log-probs (+ entropy) from logits in one read: the Triton kernels.

What is fused, and why it is fast. The peers compute ``log_softmax(logits)`` ([N, V] float32
written and read back: 3 passes over memory plus the upcast copy) and then gather; entropy is a
second full pass. Here each program owns one row: it streams the row once in BLOCK_V chunks,
keeping in float32 registers an online max ``m``, ``s = sum exp(z - m)`` and
``t = sum exp(z - m) * (z - m)``, rescaled when the max moves. From those:
``logprob = (z[label] - m) - log s``, ``entropy = log s - t / s``; ``(m, log s)`` is saved for
the backward in two parts, since a rounded ``lse = m + log s`` of ~10 carries an absolute error of
~5e-7, several times torch's own on log-probs of order 1. Bytes moved: one read of the logits
plus 16 bytes per row written. The label's logit is one scalar load at a
clamped index, so an out-of-range label gives NaN, never an out-of-bounds read.

The backward is also one pass per row: it reads the logits once, recomputes
``log p_k = (z_k - m) - log s`` from the saved stats, and writes d(logits) in the logits' dtype:
``dz_k = g_lp * (1[k = label] - p_k) - g_H * p_k * (log p_k + H)``, ``dx = dz / T``.

Sampling filter (HAS_CUT): each row carries a cut (value c, token id i; rlhf_fast/_filter.py) and
token k is kept iff z_k > c or (z_k == c and k <= i); dropped tokens enter the sums as -inf and get
no gradient, a label outside the set gets -inf. The kept test recomputes z exactly as torch formed
the scaled logits the cut was found on (``x.float() / T``: IEEE division on the CPU, where the
interpreter runs; multiplication by torch's own reciprocal of T on CUDA, CUT_BY_RECIPROCAL), so a
token equal to the cut is classified as the engine classified it. Still one read of the row.

Offsets are int64 (row * stride overflows int32 beyond 2^31 elements: 16384 x 131072). Logits are
(B, T, V) with arbitrary B and T strides, so ``logits[:, :-1]`` of a [B, T+1, V] tensor is read in
place instead of being copied by a reshape.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _kept(x, cols, cut_value, cut_index, temperature, inv_temperature,
          HAS_TEMPERATURE: tl.constexpr, CUT_BY_RECIPROCAL: tl.constexpr):
    """Whether tokens ``cols`` with raw float32 logits ``x`` are in the row's kept set."""
    zk = x
    if HAS_TEMPERATURE:
        if CUT_BY_RECIPROCAL:
            zk = x * inv_temperature
        else:
            zk = x / temperature
    return (zk > cut_value) | ((zk == cut_value) & (cols <= cut_index))


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logprobs_ptr,
    entropy_ptr,
    stats_ptr,
    cut_value_ptr,
    cut_index_ptr,
    T,
    stride_b,
    stride_t,
    V,
    temperature,
    inv_temperature,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    HAS_CUT: tl.constexpr,
    CUT_BY_RECIPROCAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    label = tl.load(labels_ptr + row)
    if HAS_CUT:
        cut_value = tl.load(cut_value_ptr + row)
        cut_index = tl.load(cut_index_ptr + row)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        z = x
        if HAS_TEMPERATURE:
            z = z / temperature
        if HAS_CUT:
            keep = _kept(x, cols, cut_value, cut_index, temperature, inv_temperature, HAS_TEMPERATURE,
                         CUT_BY_RECIPROCAL)
            z = tl.where(keep & mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While every logit seen is -inf the shift is 0, so no (-inf) - (-inf) = NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        d = z - shift
        e = tl.exp(d)
        if RETURN_ENTROPY:
            # Re-reference t to the new max: t' = alpha * (t + s * (m - m_new)); s == 0 while m == -inf.
            t = alpha * (t + tl.where(s > 0, s * (m - shift), 0.0))
            t += tl.sum(tl.where(e > 0, e * d, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new

    shift = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    valid = (label >= 0) & (label < V)
    x_label = tl.load(row_ptr + tl.where(valid, label, 0)).to(tl.float32)
    z_label = x_label
    if HAS_TEMPERATURE:
        z_label = z_label / temperature
    lp = tl.where(valid, (z_label - shift) - log_s, float("nan"))
    if HAS_CUT:
        label_kept = _kept(x_label, label, cut_value, cut_index, temperature, inv_temperature, HAS_TEMPERATURE,
                           CUT_BY_RECIPROCAL)
        lp = tl.where(valid & ~label_kept, float("-inf"), lp)
    lp = tl.where(label == ignore_index, 0.0, lp)
    tl.store(logprobs_ptr + row, lp)
    tl.store(stats_ptr + 2 * row, shift)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, log_s - t / s)
    else:
        tl.store(entropy_ptr + row, 0.0)


@triton.jit
def _logprobs_bwd_kernel(
    dlogits_ptr,
    logits_ptr,
    labels_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    stats_ptr,
    entropy_ptr,
    cut_value_ptr,
    cut_index_ptr,
    T,
    stride_b,
    stride_t,
    V,
    temperature,
    inv_temperature,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    HAS_CUT: tl.constexpr,
    CUT_BY_RECIPROCAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    drow_ptr = dlogits_ptr + row * V  # d(logits) is written contiguous
    label = tl.load(labels_ptr + row)
    has_label = (label != ignore_index) & (label >= 0) & (label < V)
    if HAS_CUT:  # a label outside the kept set: a constant -inf log-prob, no gradient
        cut_value = tl.load(cut_value_ptr + row)
        cut_index = tl.load(cut_index_ptr + row)
        x_label = tl.load(row_ptr + tl.where(has_label, label, 0)).to(tl.float32)
        has_label = has_label & _kept(x_label, label, cut_value, cut_index, temperature, inv_temperature,
                                      HAS_TEMPERATURE, CUT_BY_RECIPROCAL)
    g_lp = tl.where(has_label, tl.load(grad_logprobs_ptr + row).to(tl.float32), 0.0)
    row_max = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    h = tl.load(entropy_ptr + row)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row).to(tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        z = x
        if HAS_TEMPERATURE:
            z = z / temperature
        logp = (z - row_max) - log_s
        p = tl.exp(logp)
        if HAS_CUT:
            keep = _kept(x, cols, cut_value, cut_index, temperature, inv_temperature, HAS_TEMPERATURE,
                         CUT_BY_RECIPROCAL)
            p = tl.where(keep, p, 0.0)
        dz = tl.where(cols == label, g_lp, 0.0) - g_lp * p
        if HAS_GRAD_ENTROPY:
            dz -= g_h * tl.where(p > 0, p * (logp + h), 0.0)
        if HAS_TEMPERATURE:
            dz = dz / temperature
        tl.store(drow_ptr + cols, dz.to(dlogits_ptr.dtype.element_ty), mask=mask)


def _launch_config(V: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps): chunks of up to 4096 elements (8 KiB of bf16) per loop step on a GPU;
    under the interpreter bigger blocks mean fewer slow Python-level iterations."""
    cap = 4096 if device.type == "cuda" else 16384
    block = min(triton.next_power_of_2(max(V, 1)), cap)
    num_warps = 4 if block <= 1024 else (8 if block <= 2048 else 16)
    return block, num_warps


_INV_T: dict = {}


def _cut_args(cut_value, cut_index, temperature: float, device: torch.device, dummy: torch.Tensor):
    """(cut_value, cut_index, inv_temperature, HAS_CUT, CUT_BY_RECIPROCAL) kernel arguments.

    On CUDA torch forms ``x / T`` (a Python float T) as ``x * inv`` with its own float32 reciprocal
    (ATen's div_true_kernel_cuda; how inv is rounded changed across versions), so inv is taken
    from torch on the device, once per (T, device)."""
    if cut_value is None:
        return dummy, dummy, 1.0, False, False
    by_reciprocal = device.type == "cuda"
    inv = 1.0
    if by_reciprocal and float(temperature) != 1.0:
        key = (float(temperature), str(device))
        if key not in _INV_T:
            # CPU-GPU sync point, once per (T, device)
            _INV_T[key] = float(torch.ones((), dtype=torch.float32, device=device) / float(temperature))
        inv = _INV_T[key]
    return cut_value.contiguous(), cut_index.contiguous(), inv, True, by_reciprocal


def gather_logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, return_entropy: bool, ignore_index: int,
    cut_value: torch.Tensor | None = None, cut_index: torch.Tensor | None = None,
):
    """logits: (B, T, V), any strides on B and T, unit stride along V (else copied);
    labels: (B, T) int64; cut_value / cut_index: (B, T) float32 / int64 or None (the sampling
    filter's kept set, rlhf_fast/_filter.py). Returns (logprobs, entropy, row_stats): (B, T), (B, T), (B, T, 2)
    float32; entropy is zeros unless asked for; row_stats holds (max, log sum exp(z - max)) per row
    for the backward."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    labels = labels.contiguous()
    B, T, V = logits.shape
    N = B * T
    lp = torch.empty((B, T), dtype=torch.float32, device=logits.device)
    ent = torch.empty_like(lp)
    stats = torch.empty((B, T, 2), dtype=torch.float32, device=logits.device)
    if N == 0:
        return lp, ent, stats
    block, num_warps = _launch_config(V, logits.device)
    cv, ci, inv, has_cut, by_recip = _cut_args(cut_value, cut_index, temperature, logits.device, lp)
    _logprobs_fwd_kernel[(N,)](
        logits, labels, lp, ent, stats, cv, ci, T, logits.stride(0), logits.stride(1), V, float(temperature), inv,
        int(ignore_index), BLOCK_V=block, HAS_TEMPERATURE=float(temperature) != 1.0,
        RETURN_ENTROPY=bool(return_entropy), HAS_CUT=has_cut, CUT_BY_RECIPROCAL=by_recip, num_warps=num_warps,
    )
    return lp, ent, stats


def gather_logprobs_bwd(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_stats: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
    cut_value: torch.Tensor | None = None,
    cut_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """All (B, T) except logits (B, T, V) and row_stats (B, T, 2). Returns d(logits), (B, T, V) contiguous, in the logits' dtype."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, T, V = logits.shape
    N = B * T
    # The interpreter (TRITON_INTERPRET=1, CPU tests) truncates float32 -> bfloat16 stores where a
    # GPU rounds to nearest even: there the kernel writes float32 and torch rounds, as a GPU would.
    emulate_rounding = logits.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    out_dtype = torch.float32 if emulate_rounding else logits.dtype
    dlogits = torch.empty((B, T, V), dtype=out_dtype, device=logits.device)
    if N == 0:
        return dlogits.to(logits.dtype)
    grad_logprobs = grad_logprobs.contiguous()
    has_gh = grad_entropy is not None
    gh = grad_entropy.contiguous() if has_gh else grad_logprobs
    block, num_warps = _launch_config(V, logits.device)
    cv, ci, inv, has_cut, by_recip = _cut_args(cut_value, cut_index, temperature, logits.device, row_stats)
    _logprobs_bwd_kernel[(N,)](
        dlogits, logits, labels.contiguous(), grad_logprobs, gh, row_stats.contiguous(), entropy.contiguous(),
        cv, ci, T, logits.stride(0), logits.stride(1), V, float(temperature), inv, int(ignore_index),
        BLOCK_V=block, HAS_TEMPERATURE=float(temperature) != 1.0, HAS_GRAD_ENTROPY=has_gh,
        HAS_CUT=has_cut, CUT_BY_RECIPROCAL=by_recip, num_warps=num_warps,
    )
    return dlogits.to(logits.dtype) if emulate_rounding else dlogits
