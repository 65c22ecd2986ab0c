"""Token log-probs (+ entropy) straight from hidden states, the lm_head matmul fused: Triton kernels.

What is fused, and why it is fast. The peers compute ``logits = hidden @ weight.T`` ([N, V]: 16k
tokens x 128k vocabulary is 4 GiB in bf16, 8 GiB in fp32), write it to HBM, read it back for the
log-softmax and again for the gather, and keep it alive for the backward. Here the logits exist
only as [BLOCK_N, BLOCK_V] tiles in registers:

Forward (``_linear_logprobs_fwd_kernel``): each program owns BLOCK_N rows and a contiguous range
of vocabulary tiles (the vocabulary is split SPLIT ways so that a small N still fills the GPU). For
each tile it accumulates ``hidden[rows] @ weight[cols].T`` over H with ``tl.dot`` (float32
accumulator), divides by the temperature and folds the tile into float32 per-row accumulators:
an online max ``m``, ``s = sum exp(z - m)``, ``t = sum exp(z - m) * (z - m)`` (both rescaled when
the max moves) and the label's logit ``z_y`` (picked out of the tile by comparison, so no gather
and no out-of-bounds read for a bad label). Each split writes four floats per row; the launcher
merges the SPLIT partials with a few [SPLIT, N] torch ops:
``log S = log sum_s s_s e^{m_s - M}``, ``entropy = log S - T / S``,
``logprob = (z_y - M) - log S``. Like ``gather_logprobs``, the row's log-sum-exp is kept in two
parts, ``row_stats = (M, log S)``: a rounded lse of ~10 carries ~5e-7 absolute error, more than
torch's own log_softmax has on log-probs of order 1.
HBM traffic: hidden and weight are streamed (the weight once per row block, from L2 mostly), plus
16 * SPLIT bytes per row. It is a matmul with a softmax epilogue: compute-bound, like attention.

Backward (``_linear_logprobs_bwd_kernel``), one program per (row block, vocab block) tile: it
recomputes the logits tile with ``tl.dot``, forms the float32 d(logits) tile from the saved
row stats and entropy, ``log p_k = (z_k - M) - log S``,
``dz_k = (g_lp * (1[k = y] - p_k) - g_H * p_k * (log p_k + H)) / T``,
and immediately contracts it: ``dhidden[rows] += dz @ weight[cols]`` and
``dweight[cols] += dz.T @ hidden[rows]``, one BLOCK_H slice of H at a time, with float32
``tl.atomic_add`` into [N, H] and [V, H] float32 accumulators (cast to the input dtype at the end).
Why atomics and not a two-kernel split: a split either stores d(logits) (an [N, V] or chunked
buffer — the memory this op exists to avoid) or recomputes the logits tile once per output H
block (H / BLOCK_H times the forward's flops); atomics cost one kernel, one recompute and
N*V*H*(1/BLOCK_N + 1/BLOCK_V) float32 adds that mostly hit L2 (the approach of Cut Cross-Entropy).
The price: the summation order, hence the last bits of the gradients, is not deterministic.
On the GPU the d(logits) tile is rounded to the input dtype before the two ``tl.dot`` (bf16 tensor
cores; as Cut Cross-Entropy does); the accumulators stay float32.

Offsets are int64 (row * stride overflows int32 beyond 2^31 elements). hidden is (N, H) and
weight (V, H), each with a unit stride along H (the launchers copy otherwise).
Interpreter note: under ``TRITON_INTERPRET=1`` a bf16 ``tl.dot`` is wrong, so ``DOT_FP32`` casts
the tiles to float32 first; it is off on a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """hidden[rows] @ weight[cols].T as a (BLOCK_N, BLOCK_V) float32 tile (0 where masked)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * stride_wv + ks[None, :],
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _linear_logprobs_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    labels_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    zy_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    tiles_per_split,
    temperature,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_mask = cols < V
        z = _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv,
                         BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, DOT_PRECISION)
        if HAS_TEMPERATURE:
            z = z / temperature
        z = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # While every logit seen is -inf the shift is 0, so no (-inf) - (-inf) = NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        d = z - shift[:, None]
        e = tl.exp(d)
        if RETURN_ENTROPY:
            # Re-reference t to the new max: t' = alpha * (t + s * (m - m_new)); s == 0 while m == -inf.
            t = alpha * (t + tl.where(s > 0, s * (m - shift), 0.0))
            t += tl.sum(tl.where(e > 0, e * d, 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
        zy += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), axis=1)

    out = split * N + rows
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(t_ptr + out, t, mask=row_mask)
    tl.store(zy_ptr + out, zy, mask=row_mask)


@triton.jit
def _linear_logprobs_bwd_kernel(
    hidden_ptr,
    weight_ptr,
    labels_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    stats_ptr,
    entropy_ptr,
    dhidden_ptr,
    dweight_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    temperature,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_TEMPERATURE: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_mask = rows < N
    col_mask = cols < V
    tile_mask = row_mask[:, None] & col_mask[None, :]

    z = _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask, H, stride_hn, stride_wv,
                     BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, DOT_PRECISION)
    if HAS_TEMPERATURE:
        z = z / temperature
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    has_label = (labels != ignore_index) & (labels >= 0) & (labels < V)
    g_lp = tl.where(has_label, tl.load(grad_logprobs_ptr + rows, mask=row_mask, other=0.0).to(tl.float32), 0.0)
    row_max = tl.load(stats_ptr + 2 * rows, mask=row_mask, other=0.0)
    log_sum = tl.load(stats_ptr + 2 * rows + 1, mask=row_mask, other=0.0)
    logp = (z - row_max[:, None]) - log_sum[:, None]
    p = tl.exp(logp)
    dz = tl.where(cols[None, :] == labels[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        ent = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        dz -= g_h[:, None] * tl.where(p > 0, p * (logp + ent[:, None]), 0.0)
    if HAS_TEMPERATURE:
        dz = dz / temperature
    dz = tl.where(tile_mask, dz, 0.0)  # padded rows / columns contribute nothing
    if not DOT_FP32:
        dz = dz.to(hidden_ptr.dtype.element_ty)

    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_mask = ks < H
        h = tl.load(hidden_ptr + rows[:, None] * stride_hn + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + cols[:, None] * stride_wv + ks[None, :],
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        dh = tl.dot(dz, w, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_H)
        tl.atomic_add(dhidden_ptr + rows[:, None] * H + ks[None, :], dh,
                      mask=row_mask[:, None] & k_mask[None, :])
        dw = tl.dot(tl.trans(dz), h, input_precision=DOT_PRECISION)  # (BLOCK_V, BLOCK_H)
        tl.atomic_add(dweight_ptr + cols[:, None] * H + ks[None, :], dw,
                      mask=col_mask[:, None] & k_mask[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_config(N: int, V: int, H: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes, warps and the dot flags in one place. On a GPU, bf16 / fp16: 128 x 128 logits
    tiles (the shape attention kernels use for a 64-wide K step), 8 warps, 3 stages. float32 (an
    "ieee" dot: CUDA-core FMAs, no tensor cores): 64 x 64 x 16, 2 stages; the 128 x 128 x 64 tiles
    spilled up to ~11 KB (forward) and ~42 KB (backward) per thread and the backward's 208 KiB
    of pipelined shared memory does not fit an sm_80 block (163 KB); at 64 x 64 x 16 ptxas
    reports at most 128 / 198 registers and no spills (benchmarks/triton_aot.py). The bf16
    backward spills ~300 bytes per thread on sm_80 (none on sm_90); BLOCK_H = 32 would not, a
    change left until it can be timed on an A100. Under the interpreter: the smallest legal tiles
    (tl.dot needs >= 16) sized to the problem, so the numpy emulation stays quick."""
    interp = _interpreting() or device.type != "cuda"
    if interp:
        cfg = dict(
            BLOCK_N=min(32, max(16, triton.next_power_of_2(N))),
            BLOCK_V=min(64, max(16, triton.next_power_of_2(V))),
            BLOCK_H=min(32, max(16, triton.next_power_of_2(H))),
            num_warps=4,
        )
    elif dtype == torch.float32:
        cfg = dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=16, num_warps=8, num_stages=2)
    else:
        cfg = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3)
    cfg["DOT_FP32"] = interp or dtype == torch.float32
    # float32 inputs: exact fp32 products, as torch's matmul (tf32 would lose ~3 decimal digits).
    cfg["DOT_PRECISION"] = "ieee" if dtype == torch.float32 else "tf32"
    return cfg


def _num_splits(N: int, V: int, cfg: dict, device: torch.device) -> tuple[int, int]:
    """(splits, tiles_per_split): split the vocabulary until there are ~2 programs per SM."""
    n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    row_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = max(1, triton.cdiv(2 * sms, row_blocks))
    else:
        want = 1
    per = triton.cdiv(n_tiles, min(want, n_tiles))
    return triton.cdiv(n_tiles, per), per


def _rowwise(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def linear_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    return_entropy: bool,
    ignore_index: int,
    *,
    splits: int | None = None,
):
    """hidden: (N, H), weight: (V, H), same dtype (float32 / bfloat16 / float16), unit stride
    along H (else copied); labels: (N,) int64. ``splits`` overrides the vocabulary split (tests).
    Returns (logprobs (N,), entropy (N,), row_stats (N, 2)) float32; row_stats holds the row max
    and log sum exp(z - max); entropy is zeros unless asked for."""
    hidden, weight, labels = _rowwise(hidden), _rowwise(weight), labels.contiguous()
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    if N == 0:
        z = torch.empty(0, dtype=torch.float32, device=dev)
        return z, z.clone(), z.new_empty((0, 2))
    cfg = _launch_config(N, V, H, hidden.dtype, dev)
    n_split, per = _num_splits(N, V, cfg, dev)
    if splits is not None:
        per = triton.cdiv(triton.cdiv(V, cfg["BLOCK_V"]), splits)
        n_split = triton.cdiv(triton.cdiv(V, cfg["BLOCK_V"]), per)
    m, s, t, zy = (torch.empty((n_split, N), dtype=torch.float32, device=dev) for _ in range(4))
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), n_split)
    _linear_logprobs_fwd_kernel[grid](
        hidden, weight, labels, m, s, t, zy, N, V, H, hidden.stride(0), weight.stride(0), per,
        float(temperature), HAS_TEMPERATURE=float(temperature) != 1.0, RETURN_ENTROPY=bool(return_entropy), **cfg,
    )
    # Merge the vocabulary splits (a few [splits, N] elementwise ops; trivial for splits == 1).
    top = m.max(0).values
    shift = torch.where(top == float("-inf"), 0.0, top)
    a = torch.exp(m - shift)
    s_all = (s * a).sum(0)
    log_s = torch.log(s_all)
    if return_entropy:
        t_all = (a * (t + torch.where(s > 0, s * (m - shift), 0.0))).sum(0)
        ent = log_s - t_all / s_all
    else:
        ent = torch.zeros_like(log_s)
    valid = (labels >= 0) & (labels < V)
    lp = torch.where(valid, (zy.sum(0) - shift) - log_s, float("nan"))
    lp = torch.where(labels == ignore_index, 0.0, lp)
    return lp, ent, torch.stack([shift, log_s], dim=-1)


def linear_logprobs_bwd(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    row_stats: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    ignore_index: int,
):
    """hidden: (N, H), weight: (V, H); grad_logprobs, grad_entropy, labels, entropy: (N,);
    row_stats: (N, 2) from the forward.
    Returns (d_hidden (N, H) in hidden's dtype, d_weight (V, H) in weight's dtype)."""
    hidden, weight = _rowwise(hidden), _rowwise(weight)
    N, H = hidden.shape
    V = weight.shape[0]
    dh = torch.zeros((N, H), dtype=torch.float32, device=hidden.device)
    dw = torch.zeros((V, H), dtype=torch.float32, device=hidden.device)
    if N == 0:
        return dh.to(hidden.dtype), dw.to(weight.dtype)
    cfg = _launch_config(N, V, H, hidden.dtype, hidden.device)
    glp = grad_logprobs.to(torch.float32).contiguous()
    has_gh = grad_entropy is not None
    gh = grad_entropy.to(torch.float32).contiguous() if has_gh else glp
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
    _linear_logprobs_bwd_kernel[grid](
        hidden, weight, labels.contiguous(), glp, gh, row_stats.contiguous(), entropy.contiguous(), dh, dw,
        N, V, H, hidden.stride(0), weight.stride(0), float(temperature), int(ignore_index),
        HAS_TEMPERATURE=float(temperature) != 1.0, HAS_GRAD_ENTROPY=has_gh, **cfg,
    )
    return dh.to(hidden.dtype), dw.to(weight.dtype)
