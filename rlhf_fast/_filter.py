"""The sampling filter's kept set (top-k, then top-p), one rule for the engine, the ops and the reference.

``filter_logits`` is the rule the engine samples with (``rlhf_fast.engine.sampling.sample_next``);
the fused log-prob ops (``rlhf_fast.ops.gather_logprobs`` / ``linear_logprobs``) and their float64
references take their kept set from the same function, so on the same float32 logits the trainer
renormalises over exactly the tokens the sampler could draw (ties included).

The kept set of a row is always a prefix of the row's tokens in the order (logit descending,
token id ascending): top-k keeps every token >= the k-th largest logit (a prefix that ends after
the last tie), top-p keeps a prefix of the stable descending sort (ties go to lower ids). So it
is described by two numbers per row, the *cut*: the logit ``c`` and the token id ``i`` of its last
element. Token j with scaled logit z_j is kept iff ``z_j > c`` or ``z_j == c and j <= i``. The
kernels take the cut ((N,) float32 and (N,) int64) instead of an [N, V] mask.
"""

from __future__ import annotations

import torch

from rlhf_fast._checks import check_int, check_real

# Bytes of the float32 scaled logits per chunk of rows when finding cuts. The top-p sort holds
# about ten times that at its peak (filtered copy, sorted values, int64 order, probabilities,
# cumsum, masks), so a chunk stays near 160 MiB whatever N.
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
    """Top-k then top-p filtering of (..., V) float logits (already temperature-scaled; ties at the
    top-p cut are broken towards lower token ids): removed tokens get -inf. Returns a new tensor
    unless nothing is filtered. The engine samples from ``softmax`` of this."""
    V = z.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        # stable: among tied logits the lower token id ranks first, so the nucleus is the same set
        # on every device and path (an unstable sort may cut a tie differently on a GPU)
        sorted_z, order = torch.sort(z, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # Remove a token when the mass of the tokens ranked above it already reaches top_p
        # (HF TopPLogitsWarper: ascending cumsum <= 1 - top_p); rank 0 is always kept.
        before = torch.cumsum(probs, dim=-1) - probs
        remove_sorted = before >= top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted)
        z = z.masked_fill(remove, float("-inf"))
    return z


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits.float() / temperature`` as the engine forms it (``sample_next``): the cut is found
    on, and the kernels compare against, exactly these float32 values."""
    return logits.float() / temperature


def cut_of_kept(z: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cut value (...,) float32, cut index (...,) int64) of a kept mask that is a prefix of the
    (z descending, id ascending) order, as ``filter_logits`` keeps."""
    inf = torch.tensor(float("inf"), dtype=z.dtype, device=z.device)
    value = torch.where(kept, z, inf).amin(-1)
    ids = torch.arange(z.shape[-1], device=z.device)
    index = torch.where(kept & (z == value.unsqueeze(-1)), ids, -1).amax(-1)
    return value.float(), index


@torch.no_grad()
def kept_cut(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """The cut of every row of (..., V) ``logits`` under the engine's filter at ``temperature``:
    ((...,) float32, (...,) int64), or None when the filter keeps everything (top_k 0 or >= V,
    top_p 1). Rows are processed ``CUT_CHUNK_BYTES`` at a time (never an [N, V] sort at once).

    Top-k alone needs no sort: the cut is the k-th largest scaled logit and the last id (every tie
    with it is kept). Top-p sorts (the engine's float32 softmax and cumsum over the sorted row decide
    the set; a threshold search could not reproduce that rounding exactly)."""
    V = logits.shape[-1]
    if not filter_active(top_k, top_p, V):
        return None
    lead = logits.shape[:-1]
    x = logits.reshape(-1, V)
    N = x.shape[0]
    value = torch.empty(N, dtype=torch.float32, device=logits.device)
    index = torch.empty(N, dtype=torch.int64, device=logits.device)
    rows = max(1, CUT_CHUNK_BYTES // (4 * V))
    for r0 in range(0, N, rows):
        z = scaled_logits(x[r0 : r0 + rows], temperature)
        if top_p >= 1.0:  # top-k only: 0 < top_k < V
            value[r0 : r0 + rows] = torch.topk(z, top_k, dim=-1).values[:, -1]
            index[r0 : r0 + rows] = V - 1
        else:
            kept = filter_logits(z, top_k, top_p) > float("-inf")
            # a row of only -inf logits keeps nothing finite: keep it whole (its log-probs are
            # -inf / NaN either way, as without a filter)
            kept |= ~kept.any(-1, keepdim=True)
            v, i = cut_of_kept(z, kept)
            value[r0 : r0 + rows], index[r0 : r0 + rows] = v, i
    return value.reshape(lead), index.reshape(lead)


def kept_mask(z: torch.Tensor, cut_value: torch.Tensor, cut_index: torch.Tensor) -> torch.Tensor:
    """(..., V) bool: which tokens of the scaled logits ``z`` the cut keeps."""
    ids = torch.arange(z.shape[-1], device=z.device)
    c = cut_value.unsqueeze(-1).to(z.dtype)
    return (z > c) | ((z == c) & (ids <= cut_index.unsqueeze(-1)))
