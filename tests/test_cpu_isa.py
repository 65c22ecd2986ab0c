"""gather_logprobs across the C++ kernels' ISA builds (issue 23).

rlhf_fast/ops/_library.py builds the kernels once per vector ISA level and loads the one torch
itself runs at (``ATEN_CPU_CAPABILITY`` lowers it). This test runs the op in subprocesses under
``ATEN_CPU_CAPABILITY=avx2`` and ``=default`` (two extra builds, ~20 s each) on awkward shapes
(V not a multiple of 16, -inf logits, a strided view, temperature != 1), forward with entropy,
filtered (top-k / top-p) and backward, float32 and bfloat16, and compares with this process's
build:

- AVX2 against AVX-512: bit-identical (csrc/logprobs.cpp: 64 logical Kahan lanes on every level,
  vexp == fast_expf, explicit multiply-adds);
- the portable build (no FMA): within the numerical contract against the float64 reference
  (docs/architecture.md, "Numerical contract").

Each subprocess also reports which build it loaded, so a silent fallback to the native build (or
to the Python reference) fails the test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import rlhf_fast.ops as ops
import rlhf_fast.reference as ref
from rlhf_fast.ops import _library
from rlhf_fast.testing import assert_no_worse_than_baseline

IGNORE = -100
# (B, T, V, case kwargs)
SHAPES = [
    (2, 3, 37, {}),  # V < 2 x 16, not a multiple of 16
    (1, 5, 341, {"neg_inf": True}),  # -inf logits, V % 16 = 5
    (2, 2, 4999, {"strided": True}),  # logits[:, :-1]-style view
    (1, 2, 32000, {"scale": 8.0}),
]
DTYPES = [torch.float32, torch.bfloat16]
# (name, temperature, top_k, top_p)
MODES = [("plain", 1.0, 0, 1.0), ("temp", 0.7, 0, 1.0), ("filtered", 1.0, 20, 0.9), ("filtered_temp", 0.7, 0, 0.8)]


def _case(B, T, V, dtype, *, scale=3.0, neg_inf=False, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(B, T + int(strided), V, generator=g) * scale
    if neg_inf:
        full[..., : V // 3] = float("-inf")
    labels = torch.randint(V // 3 if neg_inf else 0, V, (B, T), generator=g)
    labels[0, 0] = IGNORE
    g_lp = torch.randn(B, T, generator=g, dtype=torch.float64)
    g_h = torch.randn(B, T, generator=g, dtype=torch.float64)
    return full[:, :T].to(dtype), labels, g_lp, g_h


def _finite(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _run(fn, x, labels, g_lp, g_h, kw):
    x = x.detach().clone().requires_grad_(True)
    lp, h = fn(x, labels, return_entropy=True, ignore_index=IGNORE, **kw)
    ((_finite(lp.double()) * g_lp).sum() + (h.double() * g_h).sum()).backward()
    return lp.detach(), h.detach(), x.grad


def _cases():
    for B, T, V, ckw in SHAPES:
        for dtype in DTYPES:
            x, labels, g_lp, g_h = _case(B, T, V, dtype, **ckw)
            for mode, temperature, top_k, top_p in MODES:
                kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
                yield f"{B}x{T}x{V}-{str(dtype)[6:]}-{mode}", x, labels, g_lp, g_h, kw


def compute_all(cases) -> dict:
    """Every case through the public op in this process: name -> (logprobs, entropy, d_logits)."""
    return {name: _run(ops.gather_logprobs, x, labels, g_lp, g_h, kw) for name, x, labels, g_lp, g_h, kw in cases}


def _in_subprocess(capability: str, tmp_path) -> dict:
    # The inputs travel in a file: torch's own random draws differ between ISA levels (randn under
    # ATEN_CPU_CAPABILITY=default is not randn under AVX-512), so the subprocess must not redraw them.
    cases = os.path.join(str(tmp_path), "cases.pt")
    torch.save(list(_cases()), cases)
    out = os.path.join(str(tmp_path), f"{capability}.pt")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    if capability == "avx2":  # the rest of torch at AVX2 too, as on an AVX2-only machine
        env.update(ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import test_cpu_isa as t; "
        "from rlhf_fast.ops import _library; "
        "torch.save({'isa': _library.loaded_isa(), 'capability': _library.torch_cpu_capability(), "
        "'results': t.compute_all(torch.load(sys.argv[3]))}, sys.argv[2])"
    )
    proc = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), out, cases], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"ATEN_CPU_CAPABILITY={capability} run failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(out)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.fixture(scope="module")
def native():
    if not _library.load_extension():
        pytest.skip(f"C++ kernels not built: {_library._STATE['error']}")
    return _library.loaded_isa(), compute_all(_cases())


def test_avx2_build_is_bit_identical_to_avx512(native, tmp_path):
    isa, results = native
    if isa not in ("avx512", "avx2"):
        pytest.skip(f"this CPU runs the {isa} build; the AVX2 build cannot be compared here")
    other = _in_subprocess("avx2", tmp_path)
    assert other["isa"] == "avx2", other
    for name, mine in results.items():
        theirs = other["results"][name]
        for what, a, b in zip(("logprobs", "entropy", "d_logits"), mine, theirs):
            assert a.dtype == b.dtype and a.shape == b.shape, (name, what)
            diff = _bits(a) != _bits(b)
            if bool(diff.any()):
                i = tuple(diff.nonzero()[0].tolist())
                raise AssertionError(f"{name} {what}: {isa} build {a[i].item()!r} != avx2 build "
                                     f"{b[i].item()!r} at {list(i)} ({int(diff.sum())} differ)")


def test_portable_build_keeps_the_numerical_contract(native, tmp_path):
    other = _in_subprocess("default", tmp_path)
    assert other["isa"] == "default", other
    for name, x, labels, g_lp, g_h, kw in _cases():
        c_lp, c_h, c_g = other["results"][name]
        o_lp, o_h, o_g = _run(ref.gather_logprobs, x.double(), labels, g_lp, g_h, kw)
        b_lp, b_h, b_g = _run(lambda *a, **k: ref.gather_logprobs(*a, compute_dtype=torch.float32, **k),
                              x, labels, g_lp, g_h, kw)
        assert c_lp.dtype == torch.float32 and c_h.dtype == torch.float32 and c_g.dtype == x.dtype, name
        scale = 1.0 + float(_finite(o_lp).abs().max())
        assert_no_worse_than_baseline(f"{name} logprobs", c_lp, o_lp, b_lp, atol=2e-6 * scale)
        assert_no_worse_than_baseline(f"{name} entropy", c_h, o_h, b_h, atol=2e-6 * (1.0 + math.log(x.shape[-1])))
        eps = torch.finfo(x.dtype).eps
        g_max = float(torch.nan_to_num(o_g.abs(), posinf=0.0).max())
        assert_no_worse_than_baseline(f"{name} d_logits", c_g, o_g, b_g, atol=4 * eps * 1e-3 + 1e-7 * (1.0 + g_max))
