"""Loading the C++ CPU kernels, and the fallback when they cannot be built.

All ``csrc/*.cpp`` files compile into one shared library (``rlhf_fast_C``) on first import, with
``torch.utils.cpp_extension.load``; the build is cached under ``~/.cache/rlhf_fast`` (override with
``RLHF_FAST_BUILD_DIR``), keyed by torch version, Python version and CPU model, because the kernels
are compiled for the host's vector ISA (``-march=native``; ``RLHF_FAST_MARCH`` picks another target,
with its own build directory). torch rebuilds when a source changes.

The library defines the ``torch.ops.rlhf_fast.*`` schemas (``TORCH_LIBRARY_FRAGMENT``) and their
CPU kernels. If it cannot be built (no compiler, or ``RLHF_FAST_NO_EXT=1``), each op module defines
the same schemas from Python and registers its reference implementation as the CPU kernel, with a
one-time warning: slower, never wrong.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import warnings

import torch

log = logging.getLogger(__name__)

_STATE: dict[str, object] = {"loaded": None, "error": None}


def _csrc_dir() -> str:
    spec = importlib.util.find_spec("rlhf_fast._csrc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("rlhf_fast._csrc (the C++ sources) is not installed")
    return list(spec.submodule_search_locations)[0]


def _cpu_tag() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        model = "".join(lines)
    except OSError:
        pass
    return hashlib.sha1(model.encode()).hexdigest()[:10]


def _march() -> str:
    """``-march`` of the x86 build: ``native`` unless ``RLHF_FAST_MARCH`` names another target
    (e.g. ``x86-64-v3``: AVX2 without AVX-512, to build for an older fleet or to reproduce its
    numerics on a newer host; it gets its own build directory)."""
    march = os.environ.get("RLHF_FAST_MARCH", "native").strip() or "native"
    if not all(c.isalnum() or c in "-_." for c in march):
        raise ValueError(f"RLHF_FAST_MARCH must be a gcc -march name such as native or x86-64-v3, got {march!r}")
    return march


def build_dir() -> str:
    root = os.environ.get("RLHF_FAST_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "rlhf_fast"
    )
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}-{_cpu_tag()}"
    if _march() != "native":
        tag += f"-march_{_march()}"
    path = os.path.join(root, tag)
    os.makedirs(path, exist_ok=True)
    return path


def load_extension() -> bool:
    """Builds (first time) and loads the C++ library; returns whether it is loaded."""
    if _STATE["loaded"] is not None:
        return bool(_STATE["loaded"])
    if os.environ.get("RLHF_FAST_NO_EXT", "0") == "1":
        _STATE.update(loaded=False, error="RLHF_FAST_NO_EXT=1")
        return False
    try:
        from torch.utils import cpp_extension

        sources = sorted(glob.glob(os.path.join(_csrc_dir(), "*.cpp")))
        cflags = ["-O3", "-fopenmp", "-fno-math-errno"]
        if platform.machine() in ("x86_64", "AMD64"):
            cflags += [f"-march={_march()}", "-mprefer-vector-width=512"]
        log.info("building / loading rlhf_fast C++ ops from %d sources", len(sources))
        cpp_extension.load(
            name="rlhf_fast_C",
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir(),
            is_python_module=False,
            verbose=os.environ.get("RLHF_FAST_VERBOSE_BUILD", "0") == "1",
        )
        _STATE.update(loaded=True)
    except Exception as exc:  # no compiler, no ninja, a broken toolchain: fall back, loudly once
        _STATE.update(loaded=False, error=f"{type(exc).__name__}: {exc}")
        warnings.warn(
            "rlhf_fast: could not build the C++ CPU kernels; CPU ops fall back to the (slower) "
            f"reference implementation. Cause: {_STATE['error']}",
            RuntimeWarning,
            stacklevel=2,
        )
    return bool(_STATE["loaded"])


def extension_loaded() -> bool:
    return bool(_STATE["loaded"])


_FALLBACK_LIB: torch.library.Library | None = None


def define_fallback(schemas: dict[str, str], cpu_impls: dict[str, object]) -> None:
    """Defines ``rlhf_fast::<name>`` from Python and registers a CPU kernel for each."""
    global _FALLBACK_LIB
    if _FALLBACK_LIB is None:
        _FALLBACK_LIB = torch.library.Library("rlhf_fast", "FRAGMENT")
    for name, schema in schemas.items():
        _FALLBACK_LIB.define(schema)
        torch.library.register_kernel(f"rlhf_fast::{name}", "cpu", cpu_impls[name], lib=_FALLBACK_LIB)
