"""scripts/test.sh installs what the tests need whenever any of it is missing (issue 16: with
hypothesis and pytest-benchmark present but triton absent it skipped the `.[dev]` install and 12
Triton tests failed). The script runs against a stand-in `python` on PATH that hides packages from
the real interpreter (a sitecustomize removes them from the import system and the installed
metadata) and records, instead of running, `pip` and `pytest`."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_SITECUSTOMIZE = textwrap.dedent("""
    import importlib.abc, importlib.metadata as md, os, sys
    HIDDEN = {n for n in os.environ.get("HIDE_PACKAGES", "").split(",") if n}

    class _Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _Hide())
    _version = md.version

    def version(name):
        if name.lower().replace("_", "-") in HIDDEN:
            raise md.PackageNotFoundError(name)
        return _version(name)

    md.version = version
""")

_PYTHON = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "python $*" >> "$CALLS"
    if [ "$1" = "-m" ] && { [ "$2" = "pip" ] || [ "$2" = "pytest" ]; }; then exit 0; fi
    PYTHONPATH="$SHIM" exec "$REAL_PYTHON" "$@"
""")


def _lock_of_this_env(tmp_path: Path, change: dict[str, str] | None = None) -> Path:
    """A lock of the running environment (so the test holds in any venv: the lock's, --latest's,
    --lowest's), with the versions in ``change`` replaced."""
    import runpy

    text = runpy.run_path(str(REPO / "scripts" / "dev_requirements.py"))["freeze"]()
    for name, version in (change or {}).items():
        text, n = re.subn(rf"(?m)^{name}==.*$", f"{name}=={version}", text)
        assert n == 1, name
    lock = tmp_path / "constraints.txt"
    lock.write_text(text)
    return lock


def _run_test_sh(tmp_path: Path, hide: str, lock_change: dict[str, str] | None = None, args=()) -> list[str]:
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    python = shim / "python"
    python.write_text(_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / f"calls-{hide or 'none'}-{len(list(tmp_path.glob('calls-*')))}.txt"
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "SHIM": str(shim), "REAL_PYTHON": sys.executable,
           "CALLS": str(calls), "HIDE_PACKAGES": hide,
           "RLHF_FAST_LOCK": str(_lock_of_this_env(tmp_path, lock_change))}
    r = subprocess.run(["bash", str(REPO / "scripts" / "test.sh"), *args, "-k", "nothing"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _run_test_sh.stderr = r.stderr  # for the callers' failure messages
    return [ln for ln in calls.read_text().splitlines() if " -m " in ln]


#: how scripts/install.sh installs the checkout at the lock's versions (its constraints file is a temp file)
_LOCK_INSTALL = "python -m pip install -q -c <constraints> -e .[dev]"


def _normalise(calls: list[str]) -> list[str]:
    return [re.sub(r"-c \S+", "-c <constraints>", c) for c in calls]


@pytest.mark.parametrize("hide, installs", [
    ("triton", [_LOCK_INSTALL]),  # the case of issue 16
    ("hypothesis", [_LOCK_INSTALL]),
    ("torch,triton", ["python -m pip install -q torch==2.13.0", _LOCK_INSTALL]),
    ("", []),
])
def test_test_sh_installs_whatever_is_missing(tmp_path, hide, installs):
    calls = _normalise(_run_test_sh(tmp_path, hide))
    assert calls == [*installs, "python -m pytest tests benchmarks --benchmark-disable -q -p no:cacheprovider -k nothing"], \
        _run_test_sh.stderr


def test_test_sh_installs_the_lock_when_a_version_drifted(tmp_path):
    """Everything installed and in pyproject's ranges, but one package at another version than the
    lock (a new user's fresh resolve, or an upgrade by hand): the default run installs the lock;
    ``--installed`` keeps what is there."""
    import importlib.metadata as md

    other = md.version("tqdm") + ".post9"
    run = "python -m pytest tests benchmarks --benchmark-disable -q -p no:cacheprovider -k nothing"
    assert _normalise(_run_test_sh(tmp_path, "", {"tqdm": other})) == [_LOCK_INSTALL, run]
    assert _normalise(_run_test_sh(tmp_path, "", {"tqdm": other}, ["--installed"])) == [run]


def test_lock_constraints_keep_torch_and_what_it_pins(tmp_path):
    """The constraints pip installs with: an installed torch pinned to itself in every mode; in lock
    mode every locked version except what that torch itself requires (a CUDA build's triton, which
    the torch wheel pins to its own version); --lowest pins each direct dependency's lower bound; a
    lock made for another Python is not applied."""
    import runpy

    mod = runpy.run_path(str(REPO / "scripts" / "dev_requirements.py"))
    lock = tmp_path / "constraints.txt"
    lock.write_text("# python: {}.{}\n# made: x\nTransformers==5.25.0\ntriton==3.9.0\nnumpy==2.4.6  # note\n".format(
        *sys.version_info[:2]))
    installed = {"torch": "2.11.0+cu128"}

    def version_of(name):
        if name not in installed:
            import importlib.metadata as md
            raise md.PackageNotFoundError(name)
        return installed[name]

    def requires_of(name):
        return ["triton==3.6.0; platform_system == 'Linux'", "nvidia-nccl-cu12==2.27.3", "sympy>=1.13.3"]

    reqs = ["torch>=2.4", "transformers>=5.17,<5.26", "tqdm", "triton>=3.0,<3.10; platform_system == 'Linux'"]
    pins, python = mod["read_lock"](lock)
    assert pins == {"transformers": "5.25.0", "triton": "3.9.0", "numpy": "2.4.6"}
    assert mod["constraints"]("lock", reqs, lock, version_of, requires_of) == [
        "torch==2.11.0+cu128", "numpy==2.4.6", "transformers==5.25.0"]
    assert mod["constraints"]("latest", reqs, lock, version_of, requires_of) == ["torch==2.11.0+cu128"]
    assert mod["constraints"]("lowest", reqs, lock, version_of, requires_of) == [
        "torch==2.11.0+cu128", "transformers==5.17", "triton==3.0"]
    installed.clear()  # no torch yet: nothing pinned for it, the whole lock applies
    assert mod["constraints"]("lock", reqs, lock, version_of, requires_of) == [
        "numpy==2.4.6", "transformers==5.25.0", "triton==3.9.0"]
    lock.write_text("# python: 2.7\ntransformers==5.25.0\n")
    assert mod["constraints"]("lock", reqs, lock, version_of, requires_of) == []
    lock.write_text("# python: 3.11\ntransformers>=5.25.0\n")
    with pytest.raises(ValueError, match="not an exact pin"):
        mod["read_lock"](lock)
    with pytest.raises(ValueError, match="unknown mode"):
        mod["constraints"]("newest", reqs, lock, version_of, requires_of)


def test_the_lock_covers_every_requirement_within_its_range():
    """constraints.txt pins every dependency and dev extra of pyproject.toml but torch (so CI's
    install is exact), each within its range, for the Python CI runs."""
    import runpy

    from packaging.requirements import Requirement

    mod = runpy.run_path(str(REPO / "scripts" / "dev_requirements.py"))
    pins, python = mod["read_lock"](REPO / "constraints.txt")
    assert python == "3.11", "CI runs Python 3.11"
    for spec in mod["requirements"]():
        req = Requirement(spec)
        name = mod["canonical"](req.name)
        if name == "torch":
            assert name not in pins
            continue
        assert name in pins, f"constraints.txt does not pin {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {spec}"


def test_dev_requirements_checks_versions_markers_and_the_checkout():
    import importlib.metadata as md
    import runpy

    mod = runpy.run_path(str(REPO / "scripts" / "dev_requirements.py"))
    reqs = mod["requirements"]()
    assert "hypothesis>=6.100" in reqs and any(r.startswith("torch") for r in reqs)
    versions = {"pytest": "8.1", "hypothesis": "6.50", "triton": "3.1"}

    def version_of(name):
        if name not in versions:
            raise md.PackageNotFoundError(name)
        return versions[name]

    got = mod["missing"](["pytest>=8", "hypothesis>=6.100", "triton>=3.0; platform_system == 'Linux'",
                          "ninja", "nothere; platform_system == 'NoSuchOS'"], version_of)
    assert got == ["hypothesis>=6.100 (found 6.50)", "ninja"]
    assert mod["this_checkout_installed"]()
