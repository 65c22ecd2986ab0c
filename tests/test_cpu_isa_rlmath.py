"""The rlmath C++ kernels (csrc/rlmath*.cpp) built for a lower vector ISA give the native build's
results: shaping (each KL estimator, with and without a clamp), GAE and masked whitening run in a
subprocess under ``ATEN_CPU_CAPABILITY=avx2`` and ``=default`` (rlhf_fast/ops/_library.py then
loads that ISA's build, issue 23), and their outputs are compared with this process's.

Every build is held to the float64 reference contract (docs/architecture.md, "Numerical
contract"). The kernels do the same float operations in the same order whatever the vector width
(csrc/rlmath_common.h, head comment), so the builds with FMA (AVX2, AVX-512) must also agree bit for
bit; the portable x86-64 build has no FMA (gcc contracts a * b + c on the others, and vexp uses
fmadd), so it differs in the last bits and is held to the contract alone. Shapes are chosen to hit every tail: B not a multiple of 16 or 8 (the GAE lane groups), T
not a multiple of the vector width nor of the GAE staging block, a bf16 case for the converting
loads. The first run of each ISA builds it (~20 s, cached under RLHF_FAST_BUILD_DIR).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast import _rlmath_checks
from rlhf_fast.ops import _library
from rlhf_fast.reference import rlmath as ref
from rlhf_fast.testing import assert_no_worse_than_baseline

# Run by the subprocess: the ops on the inputs this process drew and saved (drawn there, torch's own
# randn would differ in the last bits under another ATEN_CPU_CAPABILITY), saved with the ISA that
# was loaded.
WORKER = r"""
import sys, torch
import rlhf_fast.ops as ops
from rlhf_fast.ops import _library
sys.path.insert(0, sys.argv[3])
from test_cpu_isa_rlmath import run_ops
torch.save({"isa": _library.loaded_isa(), "out": run_ops(torch.load(sys.argv[1]))}, sys.argv[2])
"""


def cases() -> list[dict]:
    """Fixed inputs: awkward (B, T) (tails of the 16- and 8-row GAE groups, of the vector width and
    of the 64 / 128-step GAE staging block), holes, empty rows, masked NaN / inf padding, bf16."""
    out = []
    for i, (B, T, dtype) in enumerate([(37, 77, torch.float32), (16, 200, torch.float32), (3, 5, torch.float32),
                                       (19, 131, torch.bfloat16), (64, 512, torch.float32)]):
        gen = torch.Generator().manual_seed(100 + i)
        m = torch.rand(B, T, generator=gen) < 0.7
        m[0] = False  # an empty row
        if B > 2:
            m[1, T // 2:] = False  # right padding
        lp = (-torch.rand(B, T, generator=gen) * 4).to(dtype)
        rf = (-torch.rand(B, T, generator=gen) * 4).to(dtype)
        lp[~m] = torch.tensor([1.0, float("nan"), float("inf")])[torch.randint(0, 3, (int((~m).sum()),), generator=gen)].to(dtype)
        r = (torch.randn(B, T, generator=gen)).to(dtype)
        v = (torch.randn(B, T, generator=gen) * 3).to(dtype)
        v[~m] = float("nan")  # never read on masked tokens
        x = (torch.randn(B, T, generator=gen) * 2 + 1e3).to(dtype)  # an offset for the shifted sums
        out.append(dict(s=torch.randn(B, generator=gen), lp=lp, rf=rf, m=m, r=r, v=v, x=x))
    return out


def run_ops(cs: list[dict]) -> dict:
    import rlhf_fast.ops as ops

    res = {}
    for i, c in enumerate(cs):
        for est in _rlmath_checks.KL_ESTIMATORS:
            for clamp in (None, 0.5):
                rw, kl = ops.shape_rewards(c["s"], c["lp"], c["rf"], c["m"], kl_coef=0.1, estimator=est, clamp=clamp)
                res[f"{i}/shape/{est}/{clamp}/rewards"], res[f"{i}/shape/{est}/{clamp}/kl"] = rw, kl
            res[f"{i}/kl_penalty/{est}"] = ops.kl_penalty(c["lp"], c["rf"], estimator=est)
        res[f"{i}/gae/adv"], res[f"{i}/gae/ret"] = ops.gae(c["r"], c["v"], c["m"], gamma=0.99, lam=0.95)
        res[f"{i}/whiten/shift"] = ops.masked_whiten(c["x"], c["m"])
        res[f"{i}/whiten/noshift"] = ops.masked_whiten(c["x"], c["m"], shift_mean=False, unbiased=False)
        res[f"{i}/moments"] = torch.ops.rlhf_fast.masked_moments(c["x"], c["m"])
    return res


def oracle_and_baseline(key: str, c: dict):
    """(float64 reference, reference in the input dtype) for one output key of run_ops."""
    i, op, *rest = key.split("/")
    m = c["m"]
    if op == "shape":
        est, clamp, which = rest
        clamp = None if clamp == "None" else float(clamp)
        idx = 0 if which == "rewards" else 1
        f = lambda dt: ref.shape_rewards(c["s"], c["lp"], c["rf"], m, kl_coef=0.1, estimator=est, clamp=clamp,
                                         compute_dtype=dt)[idx]
        return f(torch.float64), f(c["lp"].dtype)
    if op == "kl_penalty":  # unmasked: the NaN / inf padding must come out where the oracle has it
        f = lambda dt: ref.kl_penalty(c["lp"], c["rf"], estimator=rest[0], compute_dtype=dt)
        return f(torch.float64), f(c["lp"].dtype)
    if op == "gae":
        idx = 0 if rest[0] == "adv" else 1
        f = lambda dt: ref.gae(c["r"], c["v"], m, gamma=0.99, lam=0.95, compute_dtype=dt)[idx]
        return f(torch.float64), f(c["r"].dtype)
    if op == "whiten":
        kw = {} if rest[0] == "shift" else dict(shift_mean=False, unbiased=False)
        x64 = c["x"].double()
        return ref.masked_whiten(x64, m, **kw), ref.masked_whiten(c["x"].float(), m, **kw)
    return None, None


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, every NaN as one canonical NaN (a NaN's sign and payload carry no
    meaning: which NaN x86 produces differs between a full vector and a tail)."""
    t = torch.where(torch.isnan(t), torch.tensor(float("nan"), dtype=t.dtype), t)
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


def _run_isa(capability: str, cs: list[dict], tmp_path: Path) -> dict:
    inputs, out = tmp_path / "inputs.pt", tmp_path / f"{capability}.pt"
    torch.save(cs, inputs)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS="1")
    if capability == "avx2":
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    proc = subprocess.run([sys.executable, "-c", WORKER, str(inputs), str(out), str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def native() -> dict:
    if not _library.extension_loaded():
        pytest.skip(f"C++ library not built: {_library._STATE['error']}")
    cs = cases()
    return {"isa": _library.loaded_isa(), "cases": cs, "out": run_ops(cs)}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA levels")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_lower_isa_build_matches_native(capability, native, tmp_path):
    order = ["default", "avx2", "avx512"]
    if native["isa"] not in order or order.index(native["isa"]) < order.index(capability):
        pytest.skip(f"this CPU runs {native['isa']}, below {capability}")
    cs = native["cases"]
    got = _run_isa(capability, cs, tmp_path)
    assert got["isa"] == capability  # the subprocess loaded that ISA's build, not the native one
    for key, want in native["out"].items():
        have = got["out"][key]
        c = cs[int(key.split("/")[0])]
        oracle, baseline = oracle_and_baseline(key, c)
        if oracle is not None:  # the contract, for both builds
            atol = 2e-6 * (1.0 + float(oracle.abs().nan_to_num(posinf=0.0, neginf=0.0).max()))
            for who, out in (("native", want), (capability, have)):
                assert_no_worse_than_baseline(f"{key} ({who})", out, oracle, baseline, atol=atol)
        if capability == "default":
            continue
        # ... and the promise of the shared source: the same bits on every ISA with FMA.
        assert torch.equal(_bits(want), _bits(have)), (
            f"{key}: {capability} build differs from {native['isa']}: max |diff| "
            f"{float((want.double() - have.double()).abs().nan_to_num().max()):.3e}")


def test_two_threads_match_one():
    """Above the kernels' threading threshold (2^22 elements per thread, csrc/rlmath_common.h) the work
    is split across torch's threads (at::parallel_for): rows, GAE lane groups, whitening chunks.
    Each element's arithmetic does not depend on the split, so 2 threads give 1 thread's bits."""
    if not _library.extension_loaded():
        pytest.skip(f"C++ library not built: {_library._STATE['error']}")
    gen = torch.Generator().manual_seed(7)
    B, T = 67, 1 << 17  # 8.8 M elements (two threads' worth); B and T off the lane multiples
    T -= 3
    m = torch.rand(B, T, generator=gen) < 0.8
    lp, rf = -torch.rand(B, T, generator=gen) * 3, -torch.rand(B, T, generator=gen) * 3
    cs = [dict(s=torch.randn(B, generator=gen), lp=lp, rf=rf, m=m, r=torch.randn(B, T, generator=gen),
               v=torch.randn(B, T, generator=gen), x=torch.randn(B, T, generator=gen) + 50.0)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_ops(cs)
        torch.set_num_threads(2)
        two = run_ops(cs)
    finally:
        torch.set_num_threads(before)
    for key, want in one.items():
        assert torch.equal(_bits(want), _bits(two[key])), key
