"""Loading the C++ CPU kernels, and the fallback when they cannot be built.

All ``csrc/*.cpp`` files compile into one shared library (``rlhf_fast_C``) on first import, with
``torch.utils.cpp_extension.load``, for the vector ISA torch dispatches its own kernels to on this
machine (AVX-512, AVX2 or portable on x86; NEON or SVE on aarch64; see ``isa_build``). The build is
cached under ``~/.cache/rlhf_fast`` (override with ``RLHF_FAST_BUILD_DIR``), one directory per torch
version, Python version, machine and ISA. torch rebuilds when a source changes.

The library defines the ``torch.ops.rlhf_fast.*`` schemas (``TORCH_LIBRARY_FRAGMENT``) and their
CPU kernels. If it cannot be built (no compiler, or ``RLHF_FAST_NO_EXT=1``), each op module defines
the same schemas from Python and registers its reference implementation as the CPU kernel, with a
one-time warning: slower, never wrong.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import platform
import sys
import warnings

import torch

log = logging.getLogger(__name__)

_STATE: dict[str, object] = {"loaded": None, "error": None, "isa": None}


def _csrc_dir() -> str:
    spec = importlib.util.find_spec("rlhf_fast._csrc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("rlhf_fast._csrc (the C++ sources) is not installed")
    return list(spec.submodule_search_locations)[0]


# torch's CPU capability -> (our build's name, compiler flags). The flags name an ISA level, never
# -march=native: the build for a level runs on every CPU that has it, and the level is chosen at run
# time from what torch itself dispatches to (``torch.backends.cpu.get_cpu_capability()``, which
# honours ``ATEN_CPU_CAPABILITY``), so a cache directory shared by machines with different CPUs holds
# one build per level and each machine loads the one it can run. CPU_CAPABILITY_* selects the
# at::vec::Vectorized implementation the kernels are written in (docs/architecture.md, "CPU kernels").
_X86_ISAS = {
    "AVX512": ("avx512", ["-march=x86-64-v4", "-mtune=generic", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]),
    "AVX2": ("avx2", ["-march=x86-64-v3", "-mtune=generic", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]),
    "DEFAULT": ("default", ["-march=x86-64", "-mtune=generic", "-DCPU_CAPABILITY=DEFAULT"]),
}
_ARM_ISAS = {
    # NEON is part of armv8-a: at::vec's DEFAULT capability on aarch64 is its NEON implementation.
    "DEFAULT": ("neon", ["-march=armv8-a", "-DCPU_CAPABILITY=DEFAULT"]),
    "SVE256": ("sve256", ["-march=armv8.2-a+sve", "-msve-vector-bits=256", "-DCPU_CAPABILITY=SVE256",
                          "-DCPU_CAPABILITY_SVE", "-DCPU_CAPABILITY_SVE256"]),
}


def torch_cpu_capability() -> str:
    """The vector ISA torch's own CPU kernels run with on this machine (``AVX512``, ``AVX2``,
    ``DEFAULT``, ``SVE256``, ...): ``ATEN_CPU_CAPABILITY`` lowers it, the CPU caps it."""
    getter = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return str(getter()).upper() if getter is not None else "DEFAULT"


def isa_build(capability: str | None = None, machine: str | None = None) -> tuple[str, list[str]]:
    """(build name, extra compiler flags) of the kernels for a torch CPU capability on a machine
    (both default to this process's). An unknown capability gets the portable build."""
    capability = (capability or torch_cpu_capability()).upper()
    machine = machine or platform.machine()
    table = _X86_ISAS if machine in ("x86_64", "AMD64") else _ARM_ISAS if machine in ("aarch64", "arm64") else {}
    if capability not in table:
        warnings.warn(f"rlhf_fast: no C++ kernel build for CPU capability {capability!r} on {machine}; "
                      "using the portable (unvectorised-ISA) build", RuntimeWarning, stacklevel=2)
    return table.get(capability, table.get("DEFAULT", ("default", ["-DCPU_CAPABILITY=DEFAULT"])))


def build_dir(isa: str | None = None) -> str:
    """``<root>/torch<version>-py<version>-<machine>-<isa>``: one build per ISA level, whatever CPU
    model built it (``RLHF_FAST_BUILD_DIR`` overrides the root ``~/.cache/rlhf_fast``)."""
    root = os.environ.get("RLHF_FAST_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "rlhf_fast"
    )
    isa = isa or isa_build()[0]
    tag = (f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
           f"-{platform.machine()}-{isa}")
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
        isa, isa_flags = isa_build()
        cflags = ["-O3", "-fopenmp", "-fno-math-errno", *isa_flags]
        log.info("building / loading rlhf_fast C++ ops (%s) from %d sources", isa, len(sources))
        cpp_extension.load(
            name=f"rlhf_fast_C_{isa}",
            sources=sources,
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=build_dir(isa),
            is_python_module=False,
            verbose=os.environ.get("RLHF_FAST_VERBOSE_BUILD", "0") == "1",
        )
        _STATE.update(loaded=True, isa=isa)
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


def loaded_isa() -> str | None:
    """The ISA build of the C++ kernels in this process (``avx512``, ``avx2``, ...), None if none."""
    return _STATE["isa"] if _STATE["loaded"] else None  # type: ignore[return-value]


_FALLBACK_LIB: torch.library.Library | None = None


def define_fallback(schemas: dict[str, str], cpu_impls: dict[str, object]) -> None:
    """Defines ``rlhf_fast::<name>`` from Python and registers a CPU kernel for each."""
    global _FALLBACK_LIB
    if _FALLBACK_LIB is None:
        _FALLBACK_LIB = torch.library.Library("rlhf_fast", "FRAGMENT")
    for name, schema in schemas.items():
        _FALLBACK_LIB.define(schema)
        torch.library.register_kernel(f"rlhf_fast::{name}", "cpu", cpu_impls[name], lib=_FALLBACK_LIB)
