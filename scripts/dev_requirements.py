"""Which of the test suite's requirements are missing here: prints one per line and exits 1, or
exits 0 when all are installed.

Checked: every requirement of pyproject.toml's ``dependencies`` and ``dev`` extra whose marker
applies (triton only on Linux), each installed version against its specifier, and that
``rlhf_fast`` is installed from this checkout (not from another one, whose code the tests would
then run). Only installed metadata is read: nothing is imported, so this takes well under a second.
``scripts/test.sh`` installs ``.[dev]`` when anything is missing.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement


def requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The ``dependencies`` and ``optional-dependencies.dev`` strings of ``pyproject``."""
    text = pyproject.read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10: the two lists, read by pattern
        lists = [re.search(rf"(?ms)^{key}\s*=\s*\[(.*?)\]", text) for key in ("dependencies", "dev")]
        return [s for m in lists if m for s in re.findall(r'"([^"]+)"', m.group(1))]
    project = tomllib.loads(text)["project"]
    return list(project.get("dependencies", [])) + list(project.get("optional-dependencies", {}).get("dev", []))


def missing(reqs: list[str], version_of=md.version) -> list[str]:
    """The requirements (as written) that are not installed, or installed in a version outside
    their specifier (with the version found); markers are evaluated for this interpreter."""
    env = {**default_environment(), "extra": "dev"}
    out = []
    for spec in reqs:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        try:
            have = version_of(req.name)
        except md.PackageNotFoundError:
            out.append(spec)
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(f"{spec} (found {have})")
    return out


def this_checkout_installed() -> bool:
    spec = importlib.util.find_spec("rlhf_fast")
    if spec is None or spec.origin is None:
        return False
    return Path(spec.origin).resolve().is_relative_to(REPO)


def main() -> int:
    out = missing(requirements())
    if not this_checkout_installed():
        out.append(f"rlhf_fast (not installed from {REPO})")
    for line in out:
        print(line)
    return 1 if out else 0


if __name__ == "__main__":
    sys.exit(main())
