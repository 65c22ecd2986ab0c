"""Sampling parameters and the per-step token choice: pure functions of a (B, V) logits tensor.

Order of the logit transforms, as in Hugging Face ``generate`` (min-new-tokens processor, then
the temperature, top-k and top-p warpers): stop tokens masked to -inf until ``min_new_tokens``,
divide by the temperature, keep the top k, keep the smallest top-probability set whose mass
reaches top_p. The returned log-prob of a token is under exactly that distribution (the
"temperature-scaled, renormalised" one it was drawn from; "N Implementation Details" #10).

Sampling inverts the CDF: one uniform ``u`` per row, and the token is the first (in token-id order)
whose cumulative kept mass exceeds ``u`` times the total, found in two levels: float64 sums of
the float32 ``exp(z - max)`` over blocks of 256 ids, then a float64 walk inside the one block
where ``u * S`` falls (``torch.ops.rlhf_fast.sample_tokens``, rlhf_fast/ops/sampling.py; the C++
kernel on CPU). No sort and no float64 copy of the vocabulary (issue 35: the float64 softmax and
cumsum cost 210 ms per step at B = 64, V = 151,936; the top-p sort 1.3 s). No
``torch.multinomial``, so no host sync, and ``u`` is counter-based: a hash of (seed, step, row)
(``counter_uniform``), not a draw from a ``torch.Generator``. So there is no RNG state to carry
through a CUDA graph or a compiled step, the eager, static and compiled decode paths sample the
same tokens from the same logits (they call the same op), a row's sample does not depend on which
other rows are in the batch (finished rows can be compacted away), and one seed gives one output
on a given device.
"""

from __future__ import annotations

import collections.abc
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from rlhf_fast import ops as _ops  # noqa: F401  (registers torch.ops.rlhf_fast.sample_tokens)
from rlhf_fast._checks import check_int, check_real
# The kept-set rule lives below the engine so the log-prob ops and their references share it.
from rlhf_fast._filter import filter_logits  # noqa: F401  (public here: rlhf_fast.engine.filter_logits)

MIN_TEMPERATURE = 1e-6  # below it, float32 logits / temperature overflow (silent NaN)


@dataclass(frozen=True)
class SamplingParams:
    """How to decode.

    max_new_tokens: tokens generated per row at most (the response length R is the longest row's).
    do_sample: sample (True) or take the argmax (False, identical to HF greedy ``generate``).
    temperature: logits are divided by it before top-k / top-p and for the returned log-probs
        (also in greedy mode, where it changes only the log-probs).
    top_k: keep the k most likely tokens (0 = off). Ties with the k-th logit are kept, as in HF.
    top_p: nucleus mass (1.0 = off); the most likely token is always kept.
    min_new_tokens: EOS / stop tokens get -inf logits before this many tokens were generated.
    eos_token_id: an id or a sequence of ids that end a row (None: none).
    stop_token_ids: more ids that end a row (the stop token is kept and counted in the mask).
    seed: each row's uniform draw is a hash of (seed, step, row), so one seed gives one
        output (None: a seed drawn from torch's global CPU generator, so ``torch.manual_seed``
        still makes a run reproducible).
    """

    max_new_tokens: int
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_new_tokens: int = 0
    eos_token_id: Optional[Union[int, Sequence[int]]] = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    seed: Optional[int] = None

    def __post_init__(self):
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_int("min_new_tokens", self.min_new_tokens, 0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be an int in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens!r}"
            )
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be True or False, got {self.do_sample!r}")
        t = check_real("temperature", self.temperature)
        if not MIN_TEMPERATURE <= t < float("inf"):
            raise ValueError(f"temperature must be finite and >= {MIN_TEMPERATURE:g} (logits / temperature "
                             f"overflows float32 below that; use do_sample=False for greedy), got {self.temperature!r}")
        check_int("top_k", self.top_k, 0, what="an int >= 0 (0 = off)")
        if not 0.0 < check_real("top_p", self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        self.stop_ids()  # type and range of eos_token_id / stop_token_ids, naming the field
        if self.seed is not None:
            check_int("seed", self.seed, 0, 2**63 - 1, what="an int in [0, 2**63) or None")

    def stop_ids(self) -> tuple[int, ...]:
        """EOS and stop ids together, deduplicated, in first-seen order."""
        eos = self.eos_token_id
        if isinstance(eos, torch.Tensor):
            eos = eos.tolist()
        eos = () if eos is None else ((eos,) if isinstance(eos, int) else eos)
        stop = self.stop_token_ids
        if isinstance(stop, torch.Tensor):
            stop = stop.tolist()
        stop = (stop,) if isinstance(stop, int) else stop
        ids = []
        for name, group in (("eos_token_id", eos), ("stop_token_ids", stop)):
            if isinstance(group, (str, bytes)) or not isinstance(group, collections.abc.Sequence):
                raise ValueError(f"{name} must be an int or a sequence of ints, got {group!r}")
            for tok in group:
                if isinstance(tok, bool) or not isinstance(tok, int):
                    raise ValueError(f"{name}: token ids must be ints, got {tok!r}")
                if tok < 0:
                    raise ValueError(f"{name}: token ids must be >= 0, got {tok}")
                if tok not in ids:
                    ids.append(tok)
        return tuple(ids)


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 ``x`` in [0, 2**32), without int64 overflow (products stay
    below 2**48: signed overflow is undefined in the C++ that inductor generates)."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift / multiply rounds; full avalanche) on int64 in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seed: torch.Tensor, step, rows: torch.Tensor) -> torch.Tensor:
    """(B,) float64 uniforms in (0, 1) with 53 random bits, a pure function of (seed, step, row).

    seed: 0-d int64 tensor (its low 63 bits are mixed in); step: int or 0-d / (1,) int64 tensor;
    rows: (B,) int64 row ids (the row's index in the caller's batch, so compacting rows away does
    not change the others' draws).
    """
    seed = seed.to(torch.int64)
    key = _mix32((seed & _M32) ^ _mul32(((seed >> 32) & 0x7FFFFFFF) + 0x632BE5AB, 0x9E3779B1))
    key = _mix32((key + _mul32(torch.as_tensor(step, dtype=torch.int64, device=rows.device) & _M32, 0x85EBCA77)) & _M32)
    h1 = _mix32((key.reshape(-1)[:1] ^ _mul32(rows.to(torch.int64) & _M32, 0xC2B2AE3D)) & _M32)  # (B,)
    h2 = _mix32((h1 + 0x27D4EB2F) & _M32)
    bits = (h1 >> 5) * 67108864 + (h2 >> 6)  # 27 + 26 = 53 bits
    return (bits.to(torch.float64) + 0.5) * (1.0 / 9007199254740992.0)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    step,
    stop_ids: Optional[torch.Tensor],
    seed: torch.Tensor,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step's token choice. ``logits``: (B, V) next-token logits; ``step``: how many
    tokens were generated before this one (a host int, or an int64 tensor inside a compiled
    step); ``stop_ids``: (S,) int64 or None; ``seed``: 0-d int64 tensor; ``rows``: (B,) int64
    row ids for the per-row uniforms (``counter_uniform``).
    Returns ``(tokens (B,) int64, logprobs (B,) float32)``. No host synchronisation."""
    blocked, active = None, None
    if stop_ids is not None and params.min_new_tokens > 0:
        if isinstance(step, int):
            blocked = stop_ids if step < params.min_new_tokens else None
        else:  # a tensor step: decided inside the op, no sync and no recompilation per step
            blocked, active = stop_ids, step.reshape(-1)[:1] < params.min_new_tokens
    if params.do_sample:
        u = counter_uniform(seed, step, rows)
    else:
        u = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
    tokens, logprobs = torch.ops.rlhf_fast.sample_tokens(
        logits, u, float(params.temperature), int(params.top_k), float(params.top_p), bool(params.do_sample),
        blocked, active,
    )
    return tokens, logprobs
