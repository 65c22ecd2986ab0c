"""The sampling filter's kept set (top-k, then top-p), one rule for the engine, the ops and the reference.

``filter_logits`` is the rule the engine samples with (``rlhf_fast.engine.sampling.sample_next``);
the fused log-prob ops (``rlhf_fast.ops.gather_logprobs`` / ``linear_logprobs``) and their float64
references take their kept set from the same function, so on the same float32 logits the trainer
renormalises over exactly the tokens the sampler could draw (ties included).

The kept set
------------
Order a row's scaled logits z (float32, ``logits.float() / temperature``) by (z descending, token
id ascending). Top-k keeps every token whose z is >= the k-th largest (ties with it included).
Top-p then works on the top-k set with e_j = exp(z_j - max z) in float32 and S = the float64 sum of
those e_j: walking the order, a token is dropped when the float64 mass ranked strictly above it
already reaches ``top_p * S``; the first token is always kept. So the kept set is a prefix of the
order, described by two numbers per row, the *cut*: the logit ``c`` and the token id ``i`` of its
last element. Token j is kept iff ``z_j > c`` or ``z_j == c and j <= i``. The kernels take the cut
((N,) float32 and (N,) int64) instead of an [N, V] mask. Ties at c: the t-th tied token (id order,
t from 0) is kept iff t == 0 or ``G(c) + t * e_c < top_p * S`` (G(c): the mass strictly above c),
two float64 roundings.

Nothing sorts the vocabulary (issue 35: at V = 151,936 the sort made top-p sampling 1.3 s per step
at B = 64). The C++ kernel (csrc/sampling.cpp) finds the cut with histograms over (max z - z) and
sorts only the tokens of the bin where the mass crosses ``top_p * S``; ``kept_cut_torch`` (CUDA, and
no C++ library) bisects over the float32 values with masked float64 sums. The two agree except where
a token's mass above lies within rounding of ``top_p * S`` (the order of the float64 sums, and
torch's float32 exp against the kernel's, differ in the last bits): on one device the sampler and
the log-prob ops always call the same implementation, so they keep the same set bit for bit. A row
with a NaN, or whose max is not finite, keeps everything.
"""

from __future__ import annotations

import torch

from rlhf_fast._checks import check_int, check_real

# Bytes of the float32 scaled logits per chunk of rows in ``kept_cut_torch``: its float64 masses
# and masks hold about six times that at their peak, so a chunk stays near 100 MiB whatever N.
CUT_CHUNK_BYTES = 16 << 20


def check_filter(top_k, top_p) -> tuple[int, float]:
    """(top_k, top_p) validated: top_k an int >= 0 (0 = off), top_p a real in (0, 1] (1 = off)."""
    check_int("top_k", top_k, 0, what="an int >= 0 (0 = off)")
    p = check_real("top_p", top_p)
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    return int(top_k), p


def filter_active(top_k: int, top_p: float, vocab: int) -> bool:
    """Whether the filter can remove anything from a row of ``vocab`` tokens."""
    return 0 < top_k < vocab or top_p < 1.0


def filter_logits(z: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p filtering of (..., V) float logits (already temperature-scaled), by the rule
    of this module (``kept_cut`` at temperature 1): removed tokens get -inf. Returns a new tensor
    unless nothing is filtered. The engine samples from ``softmax`` of this."""
    cut = kept_cut(z, 1.0, top_k, top_p)
    if cut is None:
        return z
    return z.masked_fill(~kept_mask(scaled_logits(z, 1.0), *cut), float("-inf"))


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits.float() / temperature`` as the engine forms it (``sample_next``): the cut is found
    on, and the kernels compare against, exactly these float32 values."""
    return logits.float() / temperature


def _float_key(v: torch.Tensor) -> torch.Tensor:
    """int64 keys of float32 values, in the floats' order (-0.0 just below +0.0)."""
    i = v.contiguous().view(torch.int32).long()
    return torch.where(i >= 0, i, -(i & 0x7FFFFFFF) - 1)


def _key_float(k: torch.Tensor) -> torch.Tensor:
    """The float32 value of ``_float_key`` keys."""
    i = torch.where(k >= 0, k, (-(k + 1)) - 2**31)
    return i.to(torch.int32).view(torch.float32)


def _cut_rows_torch(z: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule on (n, V) float32 scaled logits, in plain torch ops with no sort and no host
    synchronisation (so a CUDA graph can hold it): top-k by ``torch.topk``; the top-p value by a
    bisection over the float32 keys (33 masked float64 sums), then the ties by id."""
    n, V = z.shape
    ninf = torch.tensor(float("-inf"), device=z.device)
    m = z.amax(-1)  # NaN if the row has one
    finite = torch.isfinite(m)
    kth = torch.topk(z, top_k, dim=-1).values[:, -1] if 0 < top_k < V else ninf.expand(n)
    last = torch.full((n,), V - 1, dtype=torch.int64, device=z.device)
    if top_p >= 1.0:
        return torch.where(finite, kth, ninf), last
    inset = z >= kth.unsqueeze(-1)
    e = (torch.exp(z - torch.where(finite, m, 0.0).unsqueeze(-1)) * inset).double()
    pS = top_p * e.sum(-1)
    lo = _float_key(torch.where(inset, z, float("inf")).amin(-1))
    hi = _float_key(torch.where(finite, m, 0.0))

    def above(v):  # G(v): the float64 mass strictly above v
        return (e * (z > v.unsqueeze(-1))).sum(-1)

    for _ in range(33):  # the smallest key whose mass above is < p * S (33 halvings of 2^32 keys)
        mid = lo + torch.div(hi - lo, 2, rounding_mode="floor")
        ok = above(_key_float(mid)) < pS
        busy = lo < hi
        hi = torch.where(busy & ok, mid, hi)
        lo = torch.where(busy & ~ok, mid + 1, lo)
    c = _key_float(hi)
    tie = inset & (z == c.unsqueeze(-1))
    g_c = above(c)
    e_c = torch.where(tie, e, 0.0).amax(-1)
    rank = tie.long().cumsum(-1) - 1
    keep = tie & ((rank == 0) | ((g_c.unsqueeze(-1) + rank * e_c.unsqueeze(-1)) < pS.unsqueeze(-1)))
    index = torch.where(keep, torch.arange(V, device=z.device), -1).amax(-1)
    return torch.where(finite, c, ninf), torch.where(finite, index, last)


@torch.no_grad()
def kept_cut_torch(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """``kept_cut``'s rule in torch ops on (N, V) logits: ((N,) float32, (N,) int64). The kernel of
    ``torch.ops.rlhf_fast.kept_cut`` on CUDA and wherever the C++ library is not built; rows are
    processed ``CUT_CHUNK_BYTES`` of float32 at a time."""
    N, V = logits.shape
    value = torch.empty(N, dtype=torch.float32, device=logits.device)
    index = torch.empty(N, dtype=torch.int64, device=logits.device)
    rows = max(1, CUT_CHUNK_BYTES // (4 * V))
    for r0 in range(0, N, rows):
        z = scaled_logits(logits[r0 : r0 + rows], temperature)
        value[r0 : r0 + rows], index[r0 : r0 + rows] = _cut_rows_torch(z, top_k, top_p)
    return value, index


def _cut_op():
    """``torch.ops.rlhf_fast.kept_cut`` once ``rlhf_fast.ops`` registered it (C++ on CPU), else None."""
    try:
        return torch.ops.rlhf_fast.kept_cut
    except (AttributeError, RuntimeError):
        return None


@torch.no_grad()
def kept_cut(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """The cut of every row of (..., V) ``logits`` under the engine's filter at ``temperature``:
    ((...,) float32, (...,) int64), or None when the filter keeps everything (top_k 0 or >= V,
    top_p 1). No sort over V (see "The kept set" above): ``torch.ops.rlhf_fast.kept_cut`` (the C++
    kernel on CPU, ``kept_cut_torch`` on CUDA and without the C++ library)."""
    V = logits.shape[-1]
    if not filter_active(top_k, top_p, V):
        return None
    lead = logits.shape[:-1]
    x = logits.reshape(-1, V)
    op = _cut_op()
    if op is None:
        value, index = kept_cut_torch(x, temperature, top_k, top_p)
    else:
        value, index = op(x, float(temperature), int(top_k), float(top_p))
    return value.reshape(lead), index.reshape(lead)


def kept_mask(z: torch.Tensor, cut_value: torch.Tensor, cut_index: torch.Tensor) -> torch.Tensor:
    """(..., V) bool: which tokens of the scaled logits ``z`` the cut keeps."""
    ids = torch.arange(z.shape[-1], device=z.device)
    c = cut_value.unsqueeze(-1).to(z.dtype)
    return (z > c) | ((z == c) & (ids <= cut_index.unsqueeze(-1)))
