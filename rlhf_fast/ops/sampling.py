"""The sampler's kept set and token choice as custom ops (issue 35: no sort over the vocabulary).

``torch.ops.rlhf_fast.kept_cut(logits (N, V), temperature, top_k, top_p) -> (cut_value (N,)
float32, cut_index (N,) int64)``: the cut of ``rlhf_fast/_filter.py`` ("The kept set").

``torch.ops.rlhf_fast.kept_cut_path(logits (N, V), temperature, top_k, top_p) -> (N,) int64``: which
way the C++ kernel found each row's cut (0 no cut, 1 among the largest logits collected in the scan,
2 a sampled bracket, 3 a pass over the whole row (top-k fallbacks), 4 top-p's histogram of every
token (flat rows); -1 without the C++ library): a diagnostic.

``torch.ops.rlhf_fast.sample_tokens(logits (B, V), u (B,) float64, temperature, top_k, top_p,
do_sample, blocked_ids, block_active) -> (tokens (B,) int64, logprobs (B,) float32)``: one decode
step of ``rlhf_fast.engine.sampling.sample_next``: blocked ids (the stop ids before
``min_new_tokens``; ``block_active`` a bool tensor, or None for always) get -inf, the filter's kept
set, then the token whose float64 cumulative kept mass (in token-id order) first exceeds
``u * S``, found in two levels (sums of blocks of 256 ids, then one block), or the argmax of the
unscaled logits when ``do_sample`` is False; its log-prob is ``(z - max) - log S`` in float64,
rounded once.

CPU: the C++ kernels (csrc/sampling.cpp). CUDA, and CPU without the C++ library: the same rule in
torch ops (``_filter.kept_cut_torch``, ``_sample_torch``), with no host synchronisation, so a CUDA
graph can hold the decode step. Fake kernels let torch.compile trace both.
"""

from __future__ import annotations

import torch

from rlhf_fast import _filter
from rlhf_fast.ops import _library

# Mirrors TORCH_LIBRARY_FRAGMENT in csrc/sampling.cpp (used only when the C++ library cannot be
# built); a test checks the two agree.
SCHEMAS = {
    "kept_cut": "kept_cut(Tensor logits, float temperature, int top_k, float top_p) -> (Tensor, Tensor)",
    "kept_cut_path": "kept_cut_path(Tensor logits, float temperature, int top_k, float top_p) -> Tensor",
    "sample_tokens": (
        "sample_tokens(Tensor logits, Tensor u, float temperature, int top_k, float top_p, bool do_sample, "
        "Tensor? blocked_ids=None, Tensor? block_active=None) -> (Tensor, Tensor)"
    ),
}

BLOCK = 256  # ids per block of the two-level inverse CDF (kBlock in csrc/sampling.cpp)


def _kept_cut_torch(logits, temperature, top_k, top_p):
    if not _filter.filter_active(top_k, top_p, logits.shape[-1]):
        N, V = logits.shape
        return (torch.full((N,), float("-inf"), device=logits.device),
                torch.full((N,), V - 1, dtype=torch.int64, device=logits.device))
    return _filter.kept_cut_torch(logits, temperature, top_k, top_p)


def _kept_cut_path_torch(logits, temperature, top_k, top_p):
    """-1 per row: no C++ kernel, so none of its ways (csrc/kept_cut.h ``Found``) was taken."""
    return torch.full((logits.shape[0],), -1, dtype=torch.int64, device=logits.device)


def _sample_torch(logits, u, temperature, top_k, top_p, do_sample, blocked_ids=None, block_active=None):
    B, V = logits.shape
    x = logits.float()
    if blocked_ids is not None and blocked_ids.numel() > 0:
        if block_active is None:
            x = x.index_fill(-1, blocked_ids, float("-inf"))
        else:
            blocked = torch.zeros(V, dtype=torch.bool, device=x.device).index_fill(0, blocked_ids, True)
            x = x.masked_fill(blocked & block_active.reshape(-1)[:1], float("-inf"))
    z = x / temperature
    m = z.amax(-1, keepdim=True)
    e = torch.exp(z - m)
    if _filter.filter_active(top_k, top_p, V):
        value, index = _filter.kept_cut_torch(z, 1.0, top_k, top_p)
        e = e * _filter.kept_mask(z, value, index)
    nb = (V + BLOCK - 1) // BLOCK
    ep = torch.nn.functional.pad(e, (0, nb * BLOCK - V)).view(B, nb, BLOCK)
    blocks = ep.sum(-1, dtype=torch.float64)
    total = blocks.sum(-1)
    if do_sample:
        target = u.to(torch.float64) * total
        cum = blocks.cumsum(-1)
        bi = torch.searchsorted(cum, target.unsqueeze(-1), right=True).clamp_max(nb - 1)  # (B, 1)
        before = torch.where(bi > 0, cum.gather(-1, (bi - 1).clamp_min(0)), 0.0)
        inside = ep.gather(1, bi.unsqueeze(-1).expand(B, 1, BLOCK)).squeeze(1)  # (B, BLOCK)
        walk = before + inside.double().cumsum(-1)
        j = torch.searchsorted(walk, target.unsqueeze(-1), right=True)
        last = torch.where(inside > 0, torch.arange(BLOCK, device=x.device), -1).amax(-1, keepdim=True)
        j = torch.where(j >= BLOCK, last.clamp_min(0), j)  # rounding left u * S past the block
        tokens = (bi * BLOCK + j).squeeze(-1).clamp_max(V - 1)
    else:
        tokens = x.argmax(dim=-1)
    zt = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    logprobs = ((zt.double() - m.squeeze(-1).double()) - torch.log(total)).float()
    return tokens, logprobs


def _kept_cut_fake(logits, temperature, top_k, top_p):
    N = logits.shape[0]
    return logits.new_empty((N,), dtype=torch.float32), logits.new_empty((N,), dtype=torch.int64)


def _sample_fake(logits, u, temperature, top_k, top_p, do_sample, blocked_ids=None, block_active=None):
    B = logits.shape[0]
    return logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B,), dtype=torch.float32)


def _register() -> None:
    if not _library.load_extension():
        _library.define_fallback(SCHEMAS, {"kept_cut": _kept_cut_torch, "sample_tokens": _sample_torch,
                                           "kept_cut_path": _kept_cut_path_torch})
    torch.library.register_fake("rlhf_fast::kept_cut")(_kept_cut_fake)
    torch.library.register_fake("rlhf_fast::sample_tokens")(_sample_fake)
    torch.library.register_kernel("rlhf_fast::kept_cut", "cuda", _kept_cut_torch)
    torch.library.register_kernel("rlhf_fast::sample_tokens", "cuda", _sample_torch)


_register()
