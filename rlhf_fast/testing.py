"""The numerical contract as one helper, shared by tests and benchmarks (docs/architecture.md,
"Numerical contract").

Pass when ``max|candidate - oracle| <= 2 * max|baseline - oracle| + atol``: no worse than PyTorch
in the same dtype. The oracle is the reference in float64; the baseline is the reference run the
way a peer would (same dtype, or float32 upcast). NaN / inf must agree position by position.
"""

from __future__ import annotations

import torch


def assert_no_worse_than_baseline(
    name: str, candidate: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor, *, atol: float
) -> None:
    cand = candidate.detach().to(torch.float64).cpu()
    orac = oracle.detach().to(torch.float64).cpu()
    base = baseline.detach().to(torch.float64).cpu()
    if cand.shape != orac.shape:
        raise AssertionError(f"{name}: shape {tuple(cand.shape)} != oracle shape {tuple(orac.shape)}")
    finite_o = torch.isfinite(orac)
    # Non-finite values must match exactly (same NaN / same signed inf positions).
    mismatch = (torch.isnan(cand) != torch.isnan(orac)) | (
        ~finite_o & ~torch.isnan(orac) & (cand != orac)
    ) | (finite_o & ~torch.isfinite(cand))
    if bool(mismatch.any()):
        idx = tuple(int(i) for i in mismatch.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: non-finite mismatch at {list(idx)}: candidate {cand[idx].item()} vs oracle {orac[idx].item()}"
        )
    if not bool(finite_o.any()):
        return
    err = torch.where(finite_o, (cand - orac).abs(), 0.0)
    base_err = torch.where(finite_o & torch.isfinite(base), (base - orac).abs(), 0.0)
    bound = 2.0 * float(base_err.max()) + atol
    worst = float(err.max())
    if worst > bound:
        idx = tuple(int(i) for i in (err == err.max()).nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: max error {worst:.3e} at {list(idx)} (candidate {cand[idx].item():.8g}, oracle "
            f"{orac[idx].item():.8g}) exceeds 2 * baseline error {float(base_err.max()):.3e} + atol {atol:.1e}"
        )
