"""Every Triton kernel compiles for sm_90 (H100/H200) with the launchers' GPU choices, no GPU needed.

The other Triton tests run the kernels under TRITON_INTERPRET=1, which never calls the compiler.
Here benchmarks/triton_aot.py pushes a representative subset of launch configurations (``--quick``:
each kernel in float32 and bfloat16 with a few flag combinations) through the real pipeline down to
ptxas, in a subprocess with TRITON_INTERPRET unset (conftest sets it for this process, and under it
``triton.jit`` returns interpreter objects). The full sweep (every vocabulary, dtype and flag, sm_90
and sm_80) is ``python benchmarks/triton_aot.py``.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_aot.py"
KERNEL_FILES = [ROOT / "kernels" / f for f in ("logprobs.py", "rlmath.py", "linear_logprobs.py")]


def _toolchain_missing() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as exc:
        return f"triton with its NVIDIA backend is not installed ({exc})"
    try:
        get_ptxas(90)  # raises when neither TRITON_PTXAS_BLACKWELL_PATH nor the wheel's binary runs
    except RuntimeError as exc:
        return f"no working ptxas for sm_90: {exc}"
    return None


_MISSING = _toolchain_missing()
needs_ptxas = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _jit_kernels() -> set[str]:
    """Names of the @triton.jit functions named *_kernel in kernels/*.py (the launch entry points;
    the other jit functions are device helpers, compiled inside them)."""
    names = set()
    for path in KERNEL_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and any(
                    ast.unparse(d) in ("triton.jit", "jit") for d in node.decorator_list):
                names.add(node.name)
    return names


@pytest.fixture(scope="module")
def sm90_rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--quick", "--no-save", "--json", str(out)],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    # The script exits 1 when a kernel fails to compile; its rows say which, so only a crash stops here.
    assert out.exists(), f"triton_aot.py crashed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())["results"]


def _name(r: dict) -> str:
    return f"{r['kernel']} {r['arch']} " + " ".join(f"{k}={v}" for k, v in r["case"].items())


@needs_ptxas
def test_every_kernel_is_checked(sm90_rows):
    expected = _jit_kernels()
    assert len(expected) == 9, sorted(expected)  # the AST scan itself still finds the kernels
    assert {r["fn"] for r in sm90_rows} == expected


@needs_ptxas
def test_every_kernel_compiles_for_sm90(sm90_rows):
    failed = [f"{_name(r)}:\n{r['error']}" for r in sm90_rows if r["status"] != "ok"]
    assert not failed, "\n\n".join(failed)


@needs_ptxas
def test_no_register_spills(sm90_rows):
    # Forward kernels must not spill. The backward ones do not either at the launchers' tile
    # choices (the linear backward keeps a BLOCK_N x BLOCK_V d(logits) tile live across its H
    # loop: 222-255 registers in bf16 at 128 x 128, 161-170 in fp32 at 64 x 64 x 16); the
    # 128 x 128 x 64 fp32 tiles it used to get spilled 42 KB per thread.
    for r in sm90_rows:
        assert r["n_regs"] is not None and r["spill_store_bytes"] is not None, f"no ptxas -v log: {_name(r)}"
    spilling = [f"{_name(r)}: {r['n_regs']} registers, {r['spill_store_bytes']} bytes of spill stores"
                for r in sm90_rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spilling, "\n".join(spilling)


@needs_ptxas
def test_compile_error_is_reported(tmp_path):
    """A kernel the interpreter runs but the compiler rejects comes back as an error row carrying
    the compiler's message (tl.arange needs a power-of-two range on a GPU)."""
    (tmp_path / "bad_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def bad_kernel(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)
    """))
    code = textwrap.dedent(f"""
        import json, sys, torch
        sys.path[:0] = [{str(tmp_path)!r}, {str(SCRIPT.parent)!r}]
        import triton_aot, bad_kernel
        cfg = triton_aot.KernelConfig("bad", bad_kernel.bad_kernel, {{"BLOCK": 1000}},
                                      {{"x_ptr": torch.empty(1), "BLOCK": 1000}})
        print(json.dumps(triton_aot.compile_one(cfg, 90)))
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["status"] == "error" and "power of 2" in row["error"], row
