"""scripts/test.sh installs what the tests need whenever any of it is missing (issue 16: with
hypothesis and pytest-benchmark present but triton absent it skipped the `.[dev]` install and 12
Triton tests failed). The script runs against a stand-in `python` on PATH that hides packages from
the real interpreter (a sitecustomize removes them from the import system and the installed
metadata) and records, instead of running, `pip` and `pytest`."""

from __future__ import annotations

import os
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


def _run_test_sh(tmp_path: Path, hide: str) -> list[str]:
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    python = shim / "python"
    python.write_text(_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / f"calls-{hide or 'none'}.txt"
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "SHIM": str(shim), "REAL_PYTHON": sys.executable,
           "CALLS": str(calls), "HIDE_PACKAGES": hide}
    r = subprocess.run(["bash", str(REPO / "scripts" / "test.sh"), "-k", "nothing"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return [ln for ln in calls.read_text().splitlines() if " -m " in ln]


@pytest.mark.parametrize("hide, installs", [
    ("triton", ["python -m pip install -q -e .[dev]"]),  # the case of the issue
    ("hypothesis", ["python -m pip install -q -e .[dev]"]),
    ("torch,triton", ["python -m pip install -q torch==2.13.0", "python -m pip install -q -e .[dev]"]),
    ("", []),
])
def test_test_sh_installs_whatever_is_missing(tmp_path, hide, installs):
    calls = _run_test_sh(tmp_path, hide)
    assert calls == [*installs, "python -m pytest tests benchmarks --benchmark-disable -q -p no:cacheprovider -k nothing"]


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
