"""Which of the test suite's requirements are missing here: prints one per line and exits 1, or
exits 0 when all are installed.

Checked: every requirement of pyproject.toml's ``dependencies`` and ``dev`` extra whose marker
applies (triton only on Linux), each installed version against its specifier, and that
``rlhf_fast`` is installed from this checkout (not from another one, whose code the tests would
then run). Only installed metadata is read: nothing is imported, so this takes well under a second.
``scripts/test.sh`` installs ``.[dev]`` when anything is missing.

The lock (issue 28): ``constraints.txt`` at the checkout's root holds the exact version of every
package the test suite last passed with (all but torch, which the scripts install first and pip
never replaces), for one Python minor version, named in its header. Calls:

- ``python scripts/dev_requirements.py [--lock]``: what is missing (with ``--lock``, also every
  installed version that differs from the lock); exit 1 if anything is;
- ``--constraints MODE OUT``: writes the constraints file pip installs with, for MODE ``lock`` (the
  lock), ``latest`` (the newest releases pyproject's ranges allow) or ``lowest`` (the lowest
  version each direct dependency's range allows, as uv's ``--resolution lowest-direct``). Each mode
  pins an installed torch to its own version, and drops from the lock what that torch itself pins
  (a CUDA build's triton), so an install never replaces the user's torch;
- ``--freeze``: prints a new lock from this environment (``scripts/update_lock.sh`` writes it after
  the suite passed with it).
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import argparse
import datetime
import os
import platform
import re
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the lock; RLHF_FAST_LOCK names another file (tests use one of their own)
LOCK = Path(os.environ.get("RLHF_FAST_LOCK") or REPO / "constraints.txt")
#: installed by the scripts before anything else and never pinned by the lock
NOT_LOCKED = {"torch", "rlhf-fast", "pip", "setuptools", "wheel"}

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


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> tuple[dict[str, str], str | None]:
    """(canonical name -> exact version, the Python ``major.minor`` it was made with) of a lock."""
    pins, python = {}, None
    for line in path.read_text().splitlines():
        m = re.match(r"#\s*python:\s*(\d+\.\d+)", line)
        if m:
            python = m.group(1)
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"{path}: {line!r} is not an exact pin (name==version)")
        pins[canonical(name)] = version.strip()
    return pins, python


def lock_applies(python: str | None) -> bool:
    return python == "{}.{}".format(*sys.version_info[:2])


def lock_mismatches(pins: dict[str, str], version_of=md.version) -> list[str]:
    """The locked packages whose installed version differs from the lock, or that are absent."""
    out = []
    for name, want in sorted(pins.items()):
        try:
            have = version_of(name)
        except md.PackageNotFoundError:
            out.append(f"{name}=={want} (not installed)")
            continue
        if have != want:
            out.append(f"{name}=={want} (found {have})")
    return out


def torch_pins(version_of=md.version, requires_of=md.requires) -> tuple[list[str], set[str]]:
    """(``torch==<installed>``, the names the installed torch itself requires) or ([], set())."""
    try:
        have = version_of("torch")
    except md.PackageNotFoundError:
        return [], set()
    own = {canonical(re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0]) for r in (requires_of("torch") or [])}
    return [f"torch=={have}"], own


def lowest(reqs: list[str]) -> list[str]:
    """``name==X`` for each requirement with a lower bound ``>=X`` (torch excepted): the lowest
    versions the ranges allow, to test on purpose."""
    out = []
    for spec in reqs:
        req = Requirement(spec)
        if canonical(req.name) in NOT_LOCKED:
            continue
        lows = [s.version for s in req.specifier if s.operator == ">="]
        if lows:
            out.append(f"{req.name}=={lows[0]}")
    return out


def constraints(mode: str, reqs: list[str], lock: Path = LOCK, version_of=md.version,
                requires_of=md.requires) -> list[str]:
    """The constraint lines pip installs with in ``mode`` (``lock``, ``latest`` or ``lowest``)."""
    torch_line, torch_own = torch_pins(version_of, requires_of)
    if mode == "latest":
        return torch_line
    if mode == "lowest":
        return torch_line + lowest(reqs)
    if mode != "lock":
        raise ValueError(f"unknown mode {mode!r}: lock, latest or lowest")
    pins, python = read_lock(lock)
    if not lock_applies(python):
        print(f"dev_requirements: {lock.name} was made with Python {python}, this is "
              f"{platform.python_version()}: installing the newest releases pyproject's ranges allow",
              file=sys.stderr)
        return torch_line
    return torch_line + [f"{n}=={v}" for n, v in sorted(pins.items()) if n not in torch_own]


def freeze(date: str | None = None) -> str:
    """A lock of this environment: every distribution installed in its site-packages but
    ``NOT_LOCKED``, sorted. Only site-packages is read: a process that imported setuptools has its
    vendored copies (``setuptools/_vendor/*.dist-info``) on ``sys.path`` too."""
    seen = {}
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    for dist in md.distributions(path=site):
        name = dist.metadata["Name"]
        if name and canonical(name) not in NOT_LOCKED:
            seen.setdefault(canonical(name), dist.version)
    try:
        torch_v = md.version("torch")
    except md.PackageNotFoundError:
        torch_v = "none"
    date = date or datetime.date.today().isoformat()
    head = [
        "# The exact versions the test suite last passed with (issue 28). scripts/install.sh, scripts/test.sh,",
        "# scripts/quickstart.sh and .ci/run install with it by default; `scripts/test.sh --latest` tests the",
        "# newest releases pyproject.toml's ranges allow, `--lowest` their lower bounds. Regenerate with",
        "# `bash scripts/update_lock.sh` (a fresh venv, the newest releases, the whole suite, then this file).",
        "# torch is not locked: the scripts install torch==2.13.0 (CPU) when none is installed and keep yours.",
        f"# python: {sys.version_info[0]}.{sys.version_info[1]}",
        f"# made: {date} with torch {torch_v} on {platform.machine()}",
    ]
    return "\n".join(head + [f"{n}=={v}" for n, v in sorted(seen.items())]) + "\n"


#: the packages whose versions a test run prints first (the ones that drift and break us)
KEY_PACKAGES = ("torch", "transformers", "kernels", "deepspeed", "peft", "accelerate", "triton", "tokenizers")


def versions_line(version_of=md.version) -> str:
    def v(name):
        try:
            return version_of(name)
        except md.PackageNotFoundError:
            return "-"
    pins, python = read_lock()
    off = lock_mismatches(pins, version_of) if lock_applies(python) else ["(lock made for another Python)"]
    lock = "at the lock" if not off else f"{len(off)} package(s) off the lock, e.g. {off[0]}"
    return (f"versions: python {platform.python_version()}, " + ", ".join(f"{n} {v(n)}" for n in KEY_PACKAGES)
            + f"; {lock}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", action="store_true", help="also report installed versions that differ from the lock")
    ap.add_argument("--constraints", nargs=2, metavar=("MODE", "OUT"), help="write pip's constraints for MODE")
    ap.add_argument("--freeze", action="store_true", help="print a lock of this environment")
    ap.add_argument("--versions", action="store_true", help="print one line: Python and the key packages' versions")
    args = ap.parse_args(argv)
    if args.versions:
        print(versions_line())
        return 0
    if args.freeze:
        sys.stdout.write(freeze())
        return 0
    if args.constraints:
        mode, out_path = args.constraints
        Path(out_path).write_text("\n".join(constraints(mode, requirements())) + "\n")
        return 0
    out = missing(requirements())
    if not this_checkout_installed():
        out.append(f"rlhf_fast (not installed from {REPO})")
    if args.lock:
        pins, python = read_lock()
        if lock_applies(python):
            out += lock_mismatches(pins)
    for line in out:
        print(line)
    return 1 if out else 0


if __name__ == "__main__":
    sys.exit(main())
