"""Micro-batches by token budget (``ppo.algo.max_tokens_per_micro_batch``).

With packed sequences (``rlhf_fast/models/packing.py``) a forward costs about its valid tokens,
not rows x width, so a micro-batch is cut by tokens: consecutive rows (in the minibatch's
permutation order) while their tokens fit the budget; a row longer than the budget goes alone.
The loss is unchanged: every micro-batch's loss is a sum divided by the minibatch's normaliser
(docs/architecture.md "Variation points", a loss aggregation), whatever the cut.

Every rank holds the global minibatch (trainers/ppo_core.py), so each rank computes every rank's
cut and takes the largest count; a rank with fewer micro-batches splits its largest ones. All
ranks then run the same number of forwards / backwards (ZeRO's collectives pair up), and the
optimizer steps after that count (``Stepper.set_micro_batches``).
"""

from __future__ import annotations

import torch


def budget_chunks(tokens: list[int], budget: int) -> list[list[int]]:
    """Consecutive index runs of ``tokens`` whose sums fit ``budget`` (a longer row goes alone)."""
    chunks: list[list[int]] = []
    used = 0
    for i, n in enumerate(tokens):
        if chunks and used + n <= budget:
            chunks[-1].append(i)
            used += n
        else:
            chunks.append([i])
            used = n
    return chunks


def split_to(chunks: list[list[int]], tokens: list[int], count: int) -> list[list[int]]:
    """``chunks`` split until there are ``count``: the one with the most tokens (and two rows or
    more) is cut where its token sum halves; row order is kept."""
    chunks = [list(c) for c in chunks]
    while len(chunks) < count:
        k = max((k for k, c in enumerate(chunks) if len(c) > 1), key=lambda k: sum(tokens[i] for i in chunks[k]))
        c = chunks[k]
        total, run, cut = sum(tokens[i] for i in c), 0, len(c) - 1
        for j in range(1, len(c)):
            run += tokens[c[j - 1]]
            if run * 2 >= total:
                cut = j
                break
        chunks[k : k + 1] = [c[:cut], c[cut:]]
    return chunks


def token_budget_micro(rows: torch.Tensor, tokens: list[int], budget: int, rank: int, world: int) -> list[torch.Tensor]:
    """This rank's micro-batches of one minibatch as positions into ``rows`` (mb,) global row
    indices: rank r takes positions r::world (as the row-count plan does), cut by ``budget``
    tokens (``tokens``: the valid tokens of every global row), equal in number on every rank."""
    mb = rows.numel()
    idx = rows.tolist()
    per_rank = [list(range(r, mb, world)) for r in range(world)]
    cuts = [budget_chunks([tokens[idx[p]] for p in pos], budget) for pos in per_rank]
    count = max(len(c) for c in cuts)
    mine = per_rank[rank]
    chunks = split_to(cuts[rank], [tokens[idx[p]] for p in mine], count)
    return [torch.tensor([mine[i] for i in c], dtype=torch.long, device=rows.device) for c in chunks]


def contiguous_token_micro(global_batch: list[int], tokens: list[int], budget: int, rank: int,
                           world: int) -> list[list[int]]:
    """A dataset stage's micro-batches (``trainers/data_order.py``: rank r takes the r-th contiguous
    slice of the global batch) cut by ``budget`` tokens (``tokens``: of each item of
    ``global_batch``), equal in number on every rank."""
    per_rank = len(global_batch) // world
    slices = [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(world)]
    cuts = [budget_chunks([tokens[i] for i in sl], budget) for sl in slices]
    count = max(len(c) for c in cuts)
    mine = slices[rank]
    chunks = split_to(cuts[rank], [tokens[i] for i in mine], count)
    return [[global_batch[mine[i]] for i in c] for c in chunks]
