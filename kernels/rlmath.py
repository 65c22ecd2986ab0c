"""PPO reward / advantage math on the GPU: KL penalty, reward shaping, GAE, masked whitening.

What is fused, and why it is fast. The peers run GAE as ``for t in reversed(range(T))`` in Python
(~10 kernel launches per token: ~10k launches for T = 1024) and KL + shaping + whitening as chains
of elementwise ops, each a full pass over [B, T] in HBM. Here (bytes for [B, T] float32 inputs, a
bool mask):

* ``kl_penalty``: one elementwise pass, 8 bytes in, 4 out per token.
* ``shape_rewards``: one program per row walks its row once, *from the end*, in BLOCK_T chunks:
  the first chunk (from the end) that holds a valid token gives the row's last valid index, so the
  score is added in the same pass. 9 bytes in, 8 out per token.
* ``gae``: one launch, one program per row, walking the row from the end in BLOCK_T chunks. The
  two reverse recurrences are first-order linear, ``h_t = a_t * h_{t+1} + b_t``, so each chunk is
  an associative scan over (a, b) pairs (composition of affine maps), with the carry from the
  later chunk applied afterwards:
    1. the next *valid* value: ``w_t = m_t ? v_t : w_{t+1}`` (a = 1 - m, b = m * v), read shifted
       by one token so that the scan yields ``V_next(t) = w_{t+1}`` directly;
    2. the advantage: ``A_t = m_t ? delta_t + gamma * lam * A_{t+1} : A_{t+1}``.
  Each chunk is loaded in reversed order so the scan runs forwards (a forward scan with a
  non-commutative combine has the same meaning in the compiler and in the interpreter).
  9 bytes in (+ the shifted re-read, an L1/L2 hit), 8 out per token; accumulation in float32.
* masked whitening, two passes: ``masked_moments`` (one read: per BLOCK chunk an exact in-register
  (count, mean, M2), merged across chunks with Chan's formula in float64 by a few tiny torch ops)
  and ``masked_whiten_apply`` (one read, one write; the statistics are read from device memory,
  so no host sync between the passes, and a process group can all-reduce them in between).

Row offsets are int64 (``row * T`` overflows int32 beyond 2^31 tokens). All launchers take
contiguous (B, T) tensors; the mask is passed as uint8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: constexpr code of each KL estimator ``_kl_value`` implements (a table, not derived from the one
#: list ``_rlmath_checks.KL_ESTIMATORS``: a name added there without its branch here has no code, and
#: ``tests/test_rlmath_ops.py`` fails until both agree; a code without a branch fails to compile)
ESTIMATOR_CODES = {"k1": 0, "k2": 1, "k3": 2}


def _estimator_code(name: str) -> int:
    try:
        return ESTIMATOR_CODES[name]
    except KeyError:
        raise ValueError(f"KL estimator {name!r} has no Triton branch (kernels/rlmath.py: _kl_value, "
                         f"ESTIMATOR_CODES {sorted(ESTIMATOR_CODES)})") from None


@triton.jit
def _kl_value(lp, ref, clamp, ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr):
    d = lp - ref
    if ESTIMATOR == 0:
        k = d
    elif ESTIMATOR == 1:
        k = 0.5 * d * d
    else:
        tl.static_assert(ESTIMATOR == 2, "unknown KL estimator code (kernels/rlmath.py ESTIMATOR_CODES)")
        k = tl.exp(-d) + d - 1.0
    if HAS_CLAMP:
        k = tl.minimum(tl.maximum(k, -clamp), clamp)
    return k


@triton.jit
def _kl_penalty_kernel(lp_ptr, ref_ptr, out_ptr, N, clamp, BLOCK: tl.constexpr, ESTIMATOR: tl.constexpr,
                       HAS_CLAMP: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _kl_value(lp, ref, clamp, ESTIMATOR, HAS_CLAMP), mask=inb)


@triton.jit
def _shape_rewards_kernel(scores_ptr, lp_ptr, ref_ptr, mask_ptr, rewards_ptr, kl_ptr, T, kl_coef, clamp,
                          BLOCK_T: tl.constexpr, ESTIMATOR: tl.constexpr, HAS_CLAMP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    score = tl.load(scores_ptr + row).to(tl.float32)
    last = tl.full((), -1, tl.int32)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for c in range(0, n_chunks):
        cols = (n_chunks - 1 - c) * BLOCK_T + tl.arange(0, BLOCK_T)  # chunks from the end
        inb = cols < T
        m = tl.load(mask_ptr + base + cols, mask=inb, other=0) != 0
        lp = tl.load(lp_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + base + cols, mask=inb, other=0.0).to(tl.float32)
        k = tl.where(m, _kl_value(lp, ref, clamp, ESTIMATOR, HAS_CLAMP), 0.0)  # select: padding may be inf/NaN
        chunk_last = tl.max(tl.where(m, cols, -1), axis=0)
        last = tl.where(last < 0, chunk_last, last)  # set once, by the latest chunk holding a valid token
        r = tl.where(m, -kl_coef * k, 0.0) + tl.where(cols == last, score, 0.0)
        tl.store(kl_ptr + base + cols, k, mask=inb)
        tl.store(rewards_ptr + base + cols, r, mask=inb)


@triton.jit
def _affine_combine(a_prev, b_prev, a_new, b_new):
    # h = a_new * (a_prev * h0 + b_prev) + b_new: the new map applied after the accumulated one.
    return a_new * a_prev, a_new * b_prev + b_new


@triton.jit
def _gae_kernel(rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr, T, gamma, gamma_lam,
                BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * T
    k = tl.arange(0, BLOCK_T)
    carry_v = tl.zeros((), tl.float32)  # w at the first token of the later chunk: 0 past the end
    carry_a = tl.zeros((), tl.float32)  # running advantage at the first token of the later chunk
    n_chunks = tl.cdiv(T, BLOCK_T)
    for c in range(0, n_chunks):
        t = T - 1 - c * BLOCK_T - k  # scan order = descending time
        inb = t >= 0
        m = tl.load(mask_ptr + base + t, mask=inb, other=0) != 0
        v = tl.load(values_ptr + base + t, mask=m, other=0.0).to(tl.float32)
        r = tl.load(rewards_ptr + base + t, mask=m, other=0.0).to(tl.float32)
        # 1. V_next(t) = w_{t+1}: scan the elements of token t + 1 (identity beyond the row).
        j = t + 1
        inb_j = (j >= 0) & (j < T)
        m_j = tl.load(mask_ptr + base + j, mask=inb_j, other=0) != 0
        v_j = tl.load(values_ptr + base + j, mask=m_j, other=0.0).to(tl.float32)
        a1, b1 = tl.associative_scan((tl.where(m_j, 0.0, 1.0), tl.where(m_j, v_j, 0.0)), 0, _affine_combine)
        next_v = a1 * carry_v + b1
        # 2. A_t = delta_t + gamma * lam * A_next on valid tokens; holes pass A through.
        delta = r + gamma * next_v - v
        a2, b2 = tl.associative_scan((tl.where(m, gamma_lam, 1.0), tl.where(m, delta, 0.0)), 0, _affine_combine)
        adv = a2 * carry_a + b2
        tl.store(adv_ptr + base + t, tl.where(m, adv, 0.0), mask=inb)
        tl.store(ret_ptr + base + t, tl.where(m, adv + v, 0.0), mask=inb)
        # The chunk's earliest token (scan position BLOCK_T - 1) carries into the next chunk.
        carry_v = tl.sum(tl.where(k == BLOCK_T - 1, next_v, 0.0), axis=0)
        carry_a = tl.sum(tl.where(k == BLOCK_T - 1, adv, 0.0), axis=0)


@triton.jit
def _moments_partial_kernel(x_ptr, mask_ptr, part_ptr, N, BLOCK: tl.constexpr):
    """Per block: (count, pivot, mean of x - pivot, M2). The pivot is the block's first valid
    entry, so a mean much larger than the spread does not swamp the float32 sums (x - pivot is
    exact near the pivot); the merge adds pivot + mean in float64."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    m = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    first = tl.min(tl.where(m, offs, N), axis=0)
    pivot = tl.load(x_ptr + tl.minimum(first, N - 1)).to(tl.float32)  # unused when the block has no valid entry
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    d = tl.where(m, x - pivot, 0.0)
    n = tl.sum(m.to(tl.float32), axis=0)
    mean = tl.sum(d, axis=0) / tl.maximum(n, 1.0)
    c = tl.where(m, d - mean, 0.0)
    tl.store(part_ptr + pid * 4 + 0, n)
    tl.store(part_ptr + pid * 4 + 1, tl.where(n > 0, pivot, 0.0))
    tl.store(part_ptr + pid * 4 + 2, mean)
    tl.store(part_ptr + pid * 4 + 3, tl.sum(c * c, axis=0))


@triton.jit
def _whiten_apply_kernel(x_ptr, mask_ptr, stats_ptr, out_ptr, N, eps, BLOCK: tl.constexpr,
                         SHIFT_MEAN: tl.constexpr, UNBIASED: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    count = tl.load(stats_ptr + 0)
    mean64 = tl.load(stats_ptr + 1)
    m2 = tl.load(stats_ptr + 2)
    if UNBIASED:
        count = count - 1.0
    var = m2 / tl.maximum(count, 1.0)  # too few entries: var 0, never NaN
    rstd = (1.0 / tl.sqrt(var + eps)).to(tl.float32)
    # the mean as a float pair hi + lo: x - hi is exact near the mean, so an offset much larger
    # than the spread costs nothing (one float mean carries ~1 ulp of the offset into every output)
    mean_hi = mean64.to(tl.float32)
    mean_lo = (mean64 - mean_hi.to(tl.float64)).to(tl.float32)
    m = tl.load(mask_ptr + offs, mask=inb, other=0) != 0
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    y = ((x - mean_hi) - mean_lo) * rstd
    if not SHIFT_MEAN:
        y = y + mean_lo + mean_hi
    tl.store(out_ptr + offs, tl.where(m, y, 0.0), mask=inb)


# ---- launchers -------------------------------------------------------------------------------

def _row_block(T: int, device: torch.device) -> int:
    """BLOCK_T for the per-row kernels: up to 1024 tokens per chunk on a GPU (a few registers per
    thread at 4 warps); under the interpreter, whole rows up to 4096 (fewer Python-level steps)."""
    cap = 1024 if device.type == "cuda" else 4096
    return min(triton.next_power_of_2(max(T, 1)), cap)


def _u8(mask: torch.Tensor) -> torch.Tensor:
    return mask.contiguous().view(torch.uint8) if mask.dtype == torch.bool else mask.contiguous().to(torch.uint8)


_FLAT_BLOCK = 1024


def kl_penalty_fwd(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str, clamp: float | None):
    """logprobs, ref_logprobs: same shape, any floating dtype. Returns the float32 penalty, same shape."""
    lp, ref = logprobs.contiguous(), ref_logprobs.contiguous()
    out = torch.empty(lp.shape, dtype=torch.float32, device=lp.device)
    n = lp.numel()
    if n:
        _kl_penalty_kernel[(triton.cdiv(n, _FLAT_BLOCK),)](
            lp, ref, out, n, float(clamp or 0.0), BLOCK=_FLAT_BLOCK, ESTIMATOR=_estimator_code(estimator),
            HAS_CLAMP=clamp is not None,
        )
    return out


def shape_rewards_fwd(scores, logprobs, ref_logprobs, mask, kl_coef: float, estimator: str, clamp: float | None):
    """scores: (B,); logprobs, ref_logprobs: (B, T) floating; mask: (B, T) bool.
    Returns (rewards, kl), (B, T) float32."""
    B, T = logprobs.shape
    rewards = torch.empty((B, T), dtype=torch.float32, device=logprobs.device)
    kl = torch.empty_like(rewards)
    if B * T == 0:
        return rewards, kl
    _shape_rewards_kernel[(B,)](
        scores.contiguous(), logprobs.contiguous(), ref_logprobs.contiguous(), _u8(mask), rewards, kl, T,
        float(kl_coef), float(clamp or 0.0), BLOCK_T=_row_block(T, logprobs.device),
        ESTIMATOR=_estimator_code(estimator), HAS_CLAMP=clamp is not None,
    )
    return rewards, kl


def gae_fwd(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """rewards, values: (B, T) floating; mask: (B, T) bool. Returns (advantages, returns), (B, T) float32."""
    B, T = rewards.shape
    adv = torch.empty((B, T), dtype=torch.float32, device=rewards.device)
    ret = torch.empty_like(adv)
    if B * T == 0:
        return adv, ret
    _gae_kernel[(B,)](
        rewards.contiguous(), values.contiguous(), _u8(mask), adv, ret, T, float(gamma), float(gamma * lam),
        BLOCK_T=_row_block(T, rewards.device),
    )
    return adv, ret


def masked_moments_fwd(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x: any shape, floating; mask: same shape, bool. Returns float64 (count, mean, M2), shape (3,)."""
    x = x.contiguous()
    n = x.numel()
    if n == 0:
        return torch.zeros(3, dtype=torch.float64, device=x.device)
    block = min(triton.next_power_of_2(n), 4096)
    P = triton.cdiv(n, block)
    part = torch.empty((P, 4), dtype=torch.float32, device=x.device)
    _moments_partial_kernel[(P,)](x, _u8(mask), part, n, BLOCK=block)
    # Chan's merge of P partials in float64: a few tiny device ops, no host sync.
    p = part.double()
    cnt, mu, m2 = p[:, 0], p[:, 1] + p[:, 2], p[:, 3]
    total = cnt.sum()
    mean = (cnt * mu).sum() / total.clamp(min=1.0)
    M2 = (m2 + cnt * (mu - mean) ** 2).sum()
    return torch.stack([total, mean, M2])


def masked_whiten_apply_fwd(x, mask, stats, shift_mean: bool, unbiased: bool, eps: float) -> torch.Tensor:
    """x: any shape; mask: same shape, bool; stats: float64 (count, mean, M2). Returns float32, x's shape."""
    xc = x.contiguous()
    out = torch.empty(xc.shape, dtype=torch.float32, device=x.device)
    n = xc.numel()
    if n:
        _whiten_apply_kernel[(triton.cdiv(n, _FLAT_BLOCK),)](
            xc, _u8(mask), stats.to(torch.float64).contiguous(), out, n, float(eps), BLOCK=_FLAT_BLOCK,
            SHIFT_MEAN=bool(shift_mean), UNBIASED=bool(unbiased),
        )
    return out
