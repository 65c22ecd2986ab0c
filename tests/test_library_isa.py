"""The C++ kernels' build is chosen by ISA level at run time, never -march=native (issue 23):
rlhf_fast/ops/_library.py. (tests/test_cpu_isa*.py run the kernels at the other levels.)"""

from __future__ import annotations

import os

import pytest
import torch

from rlhf_fast.ops import _library


def test_levels_map_to_portable_flags():
    assert _library.isa_build("AVX512", "x86_64")[0] == "avx512"
    assert "-march=x86-64-v4" in _library.isa_build("AVX512", "x86_64")[1]
    name, flags = _library.isa_build("AVX2", "x86_64")
    assert name == "avx2" and "-march=x86-64-v3" in flags and "-DCPU_CAPABILITY_AVX2" in flags
    assert _library.isa_build("DEFAULT", "x86_64")[0] == "default"
    with pytest.warns(RuntimeWarning, match="AVX512_VNNI_FUTURE"):  # unknown: the portable build, said aloud
        assert _library.isa_build("AVX512_VNNI_FUTURE", "x86_64")[0] == "default"
    assert _library.isa_build("DEFAULT", "aarch64")[0] == "neon"
    assert _library.isa_build("SVE256", "aarch64")[0] == "sve256"
    for cap, machine in [("AVX512", "x86_64"), ("AVX2", "x86_64"), ("DEFAULT", "x86_64"), ("DEFAULT", "aarch64"),
                         ("SVE256", "aarch64")]:
        assert not any("native" in f for f in _library.isa_build(cap, machine)[1])


def test_build_dir_is_keyed_by_level_not_cpu_model(tmp_path, monkeypatch):
    """A home directory shared by an AVX2 and an AVX-512 machine holds one build per level; each
    loads its own level's, never the other's."""
    monkeypatch.setenv("RLHF_FAST_BUILD_DIR", str(tmp_path))
    a, b = _library.build_dir("avx2"), _library.build_dir("avx512")
    assert a != b and os.path.basename(a).endswith("-avx2") and os.path.basename(b).endswith("-avx512")
    assert torch.__version__.replace("+", "_") in os.path.basename(a)


def test_loaded_level_is_torchs():
    assert _library.load_extension(), _library._STATE["error"]
    assert _library.loaded_isa() == _library.isa_build(_library.torch_cpu_capability())[0]
