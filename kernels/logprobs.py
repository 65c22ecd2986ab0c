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
def _logprobs_fwd_kernel(
    logits_ptr,
    labels_ptr,
    logprobs_ptr,
    entropy_ptr,
    stats_ptr,
    T,
    stride_b,
    stride_t,
    V,
    temperature,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    label = tl.load(labels_ptr + row)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_TEMPERATURE:
            z = z / temperature
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
    z_label = tl.load(row_ptr + tl.where(valid, label, 0)).to(tl.float32)
    if HAS_TEMPERATURE:
        z_label = z_label / temperature
    lp = tl.where(valid, (z_label - shift) - log_s, float("nan"))
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
    T,
    stride_b,
    stride_t,
    V,
    temperature,
    ignore_index,
    BLOCK_V: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    drow_ptr = dlogits_ptr + row * V  # d(logits) is written contiguous
    label = tl.load(labels_ptr + row)
    has_label = (label != ignore_index) & (label >= 0) & (label < V)
    g_lp = tl.where(has_label, tl.load(grad_logprobs_ptr + row).to(tl.float32), 0.0)
    row_max = tl.load(stats_ptr + 2 * row)
    log_s = tl.load(stats_ptr + 2 * row + 1)
    h = tl.load(entropy_ptr + row)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row).to(tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_TEMPERATURE:
            z = z / temperature
        logp = (z - row_max) - log_s
        p = tl.exp(logp)
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


def gather_logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, return_entropy: bool, ignore_index: int
):
    """logits: (B, T, V), any strides on B and T, unit stride along V (else copied);
    labels: (B, T) int64. Returns (logprobs, entropy, row_stats): (B, T), (B, T), (B, T, 2)
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
    _logprobs_fwd_kernel[(N,)](
        logits, labels, lp, ent, stats, T, logits.stride(0), logits.stride(1), V, float(temperature), int(ignore_index),
        BLOCK_V=block, HAS_TEMPERATURE=float(temperature) != 1.0, RETURN_ENTROPY=bool(return_entropy),
        num_warps=num_warps,
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
    _logprobs_bwd_kernel[(N,)](
        dlogits, logits, labels.contiguous(), grad_logprobs, gh, row_stats.contiguous(), entropy.contiguous(),
        T, logits.stride(0), logits.stride(1), V, float(temperature), int(ignore_index),
        BLOCK_V=block, HAS_TEMPERATURE=float(temperature) != 1.0, HAS_GRAD_ENTROPY=has_gh,
        num_warps=num_warps,
    )
    return dlogits.to(logits.dtype) if emulate_rounding else dlogits
