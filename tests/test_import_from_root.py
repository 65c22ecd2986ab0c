"""rlhf_fast imports from the checkout's root, where the root is on ``sys.path`` (issue 28).

``python -m pytest``, ``python -c``, ``python -m`` / ``torchrun -m`` and a user's script or notebook
in the clone all put the checkout's root first on ``sys.path``. The root holds the folders
``kernels/`` and ``csrc/``; were either a regular package (an ``__init__.py``), it would shadow any
installed package of that name: the repo's ``kernels/`` hid Hugging Face's ``kernels``, which
transformers 5.2x imports (``cannot import name 'CUDAProperties' from 'kernels'``). Each of those
launches runs here in a subprocess whose working directory is the root, and imports what failed:
the trainers (which import transformers' hub-kernels integration through the model classes), the
Triton kernels, the C++ sources' folder, and Hugging Face's ``kernels`` itself.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: what every launch checks, run as its program (``-c``, a module body or a script)
PROBE = textwrap.dedent(
    f"""
    import importlib.metadata as md, importlib.util, os, sys
    repo = {str(REPO)!r}
    assert os.path.realpath(sys.path[0] or os.getcwd()) == os.path.realpath(repo), sys.path[:3]
    import rlhf_fast.trainers.ppo, rlhf_fast.trainers.sft, rlhf_fast.tasks, rlhf_fast.cli
    import rlhf_fast.kernels.logprobs, rlhf_fast.kernels.rlmath, rlhf_fast.kernels.linear_logprobs
    from rlhf_fast.ops._library import _csrc_dir
    assert os.path.isfile(os.path.join(_csrc_dir(), "logprobs.cpp")), _csrc_dir()
    try:
        md.version("kernels")
        hf_kernels = True
    except md.PackageNotFoundError:
        hf_kernels = False
    if hf_kernels:  # Hugging Face's package, never the checkout's folder
        import kernels
        folder = os.path.realpath(os.path.join(repo, "kernels")) + os.sep
        assert kernels.__file__ and not os.path.realpath(kernels.__file__).startswith(folder), kernels.__file__
        from kernels import CUDAProperties  # noqa: F401  (the name transformers 5.2x failed on)
    else:  # nothing, or the folder as an empty namespace portion, which transformers counts as absent
        spec = importlib.util.find_spec("kernels")
        assert spec is None or spec.origin in (None, "namespace"), spec
        from transformers.utils import is_kernels_available
        assert not is_kernels_available()
    if importlib.util.find_spec("transformers.integrations.hub_kernels") is not None:
        import transformers.integrations.hub_kernels  # noqa: F401
    print("IMPORTS-OK")
    """
)


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd, timeout=300):
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[:6])} ... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_source_folders_are_no_packages():
    """The guarantee itself: neither folder may become a regular top-level package again."""
    for folder in ("kernels", "csrc"):
        assert not (REPO / folder / "__init__.py").exists(), (
            f"{folder}/__init__.py makes {folder}/ a top-level package that shadows installed ones "
            "from the checkout's root; rlhf_fast/_source_folders.py maps the folder into rlhf_fast instead")


def test_python_c_from_root():
    assert "IMPORTS-OK" in _run([sys.executable, "-c", PROBE])


def test_user_script_in_the_clone():
    """A script saved in the clone's root: ``sys.path[0]`` is the root (a notebook's kernel started
    there has ``''``, the same directory)."""
    script = REPO / f"_user_script_{uuid.uuid4().hex}.py"
    script.write_text(PROBE)
    try:
        assert "IMPORTS-OK" in _run([sys.executable, script.name])
    finally:
        script.unlink()


def test_python_m_cli_from_root():
    out = _run([sys.executable, "-m", "rlhf_fast.cli", "--help"])
    assert "pipeline" in out


@pytest.mark.slow
def test_torchrun_m_cli_from_root():
    """The README's multi-GPU launch (``torchrun ... -m rlhf_fast.cli``), on 1 CPU process: each
    worker runs ``-m`` with the working directory on ``sys.path``."""
    out = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                "--master_port", str(_free_port()), "-m", "rlhf_fast.cli", "--help"])
    assert "pipeline" in out


def test_pytest_collects_from_root():
    """``python -m pytest`` from the root (the README's test command) collects a module that imports
    the trainers and transformers."""
    out = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                "tests/test_distributed_sft.py"])
    assert "test_two_ranks_zero2_match_one_rank" in out

