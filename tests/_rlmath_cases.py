"""Shared case generators for the rlmath tests: masks of every kind, the TRL loop, tolerances."""

from __future__ import annotations

import torch

from rlhf_fast.reference.peers import trl_gae  # noqa: F401  (re-exported for the tests)
from hypothesis import note
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MASK_KINDS = ("all", "right", "left", "holes", "empty")


def make_mask(kind: str, B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) bool. right: right-padded with lengths in [0, T] (so empty rows too); left:
    left-padded; holes: random holes with row 0 empty when B > 1; empty: no valid token."""
    pos = torch.arange(T)
    if kind == "all":
        return torch.ones(B, T, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(B, T, dtype=torch.bool)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    if kind == "right":
        return pos < lengths[:, None]
    if kind == "left":
        return pos >= (T - lengths)[:, None]
    m = torch.rand(B, T, generator=gen) < 0.6
    if B > 1:
        m[0] = False
    return m


@st.composite
def rl_cases(draw, max_b: int = 5, max_t: int = 48, dtypes=DTYPES):
    """A (B, T, dtype, mask kind, gamma, lam, seed) case with awkward values weighted in."""
    B = draw(st.integers(1, max_b))
    T = draw(st.sampled_from([1, 2, 3]) | st.integers(1, max_t))
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(MASK_KINDS))
    unit = st.sampled_from([0.0, 1.0, 0.5]) | st.floats(0.0, 1.0)
    gamma, lam = draw(unit), draw(unit)
    seed = draw(st.integers(0, 2**16))
    case = dict(B=B, T=T, dtype=dtype, kind=kind, gamma=gamma, lam=lam, seed=seed)
    note(repr(case))
    return case


def tensors(case, scale: float = 1.0):
    gen = torch.Generator().manual_seed(case["seed"])
    B, T, dt = case["B"], case["T"], case["dtype"]
    r = (torch.randn(B, T, generator=gen) * scale).to(dt)
    v = (torch.randn(B, T, generator=gen) * scale).to(dt)
    m = make_mask(case["kind"], B, T, gen)
    return r, v, m, gen


def atol_for(oracle: torch.Tensor, rel: float = 2e-6) -> float:
    scale = float(oracle.detach().abs().max()) if oracle.numel() else 0.0
    return rel * (1.0 + scale)


