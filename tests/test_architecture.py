"""The architecture's rules, checked statically from the source (docs/architecture.md):

- imports only run downward through the layers
  ``_checks -> reference (op oracles) -> kernels / _csrc -> ops -> algos / models / engine / data /
  tasks -> config -> trainers -> cli`` (function-level imports included);
- ``trainers/`` compares no variant name: a config value that selects a variant goes through a
  registry or table entry that says what the variant needs, never through ``x == "name"``;
- no trainer method is longer than ~50 lines;
- code comments cite files inside the repository, never the design notes outside it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: source folder -> the package it is importable as (pyproject's package-dir)
ROOTS = {"rlhf_fast": "rlhf_fast", "kernels": "rlhf_fast.kernels", "csrc": "rlhf_fast._csrc"}
#: layer of each top-level part of the package; a module may import its own layer or lower ones
LAYERS = {
    "rlhf_fast": 0, "rlhf_fast._checks": 0, "rlhf_fast._rlmath_checks": 0, "rlhf_fast._registry": 0,
    "rlhf_fast._filter": 0, "rlhf_fast._threads": 0, "rlhf_fast._source_folders": 0,
    "rlhf_fast.reference": 1, "rlhf_fast.testing": 1,
    "rlhf_fast.kernels": 2, "rlhf_fast._csrc": 2,
    "rlhf_fast.ops": 3,
    "rlhf_fast.algos": 4, "rlhf_fast.models": 4, "rlhf_fast.engine": 4, "rlhf_fast.data": 4, "rlhf_fast.tasks": 4,
    "rlhf_fast.config": 5,
    "rlhf_fast.trainers": 6,
    "rlhf_fast.cli": 7,
}


def _modules():
    """(module name, path, parsed tree) of every source file of the package."""
    for root, pkg in ROOTS.items():
        for f in sorted((REPO / root).rglob("*.py")):
            rel = f.relative_to(REPO / root).with_suffix("")
            name = ".".join([pkg] + [p for p in rel.parts if p != "__init__"])
            yield name, f, ast.parse(f.read_text(), filename=str(f))


def _part(module: str) -> str:
    """The layered part a module belongs to: ``rlhf_fast.x`` of ``rlhf_fast.x.y``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def _imports(tree: ast.AST):
    """(line, imported module) of every absolute ``rlhf_fast`` import; ``from rlhf_fast import x``
    imports the submodule ``rlhf_fast.x``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "rlhf_fast":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "rlhf_fast":
            if node.module == "rlhf_fast":
                for alias in node.names:
                    yield node.lineno, f"rlhf_fast.{alias.name}"
            else:
                yield node.lineno, node.module


def test_every_part_has_a_layer():
    unknown = sorted({_part(name) for name, _, _ in _modules()} - set(LAYERS))
    assert not unknown, f"add these parts to LAYERS (and to docs/architecture.md): {unknown}"


def test_imports_only_run_downward():
    upward = []
    for name, path, tree in _modules():
        mine = LAYERS[_part(name)]
        for line, target in _imports(tree):
            theirs = LAYERS.get(_part(target))
            if theirs is not None and theirs > mine:
                upward.append(f"{path.relative_to(REPO)}:{line} {_part(name)} (layer {mine}) imports {target} "
                              f"(layer {theirs})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_upward_import_check_catches_one():
    """The check itself: the old ``reference -> algos`` import (reference/ppo.py) is upward."""
    tree = ast.parse("from rlhf_fast.algos.hparams import PPOHyperParams\n")
    (_, target), = list(_imports(tree))
    assert LAYERS[_part(target)] > LAYERS["rlhf_fast.reference"]


# ---- trainers compare no variant name ------------------------------------------------------------

#: string comparisons in trainers/ that select no config variant: metric keys, the device type, a
#: metrics prefix, the reserved reward-function spec "task:gold", the start decision's internal state
#: (trainers/runs.py), the launcher's RANK variable
NOT_VARIANTS = {"k", "self.dist.device.type", "prefix", "spec", "decision.action", "os.environ.get('RANK', '0')"}


def _string_comparisons(tree: ast.AST):
    """(line, [the non-literal operands]) of ``x == "name"``, ``x != "name"`` and
    ``x in ("a", "b")`` (a key looked up in a mapping, ``"key" in d``, is not a comparison)."""

    def is_str(node):
        return isinstance(node, ast.Constant) and isinstance(node.value, str)

    def is_str_collection(node):
        return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and all(is_str(e) for e in node.elts)

    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.Eq, ast.NotEq)) and (is_str(left) or is_str(right)):
                yield node.lineno, [ast.unparse(o) for o in (left, right) if not is_str(o)]
            elif isinstance(op, (ast.In, ast.NotIn)) and is_str_collection(right):
                yield node.lineno, [ast.unparse(left)]
            left = right


def test_trainers_compare_no_variant_name():
    found = []
    for name, path, tree in _modules():
        if _part(name) != "rlhf_fast.trainers":
            continue
        for line, others in _string_comparisons(tree):
            if not set(others) <= NOT_VARIANTS:
                found.append(f"{path.relative_to(REPO)}:{line}: {' / '.join(others)} compared with a name")
    assert not found, "variant names compared in trainers/ (use the registry entry):\n" + "\n".join(found)


def test_the_variant_name_check_catches_one():
    tree = ast.parse('if hp.advantage_estimator == "gae":\n    pass\n')
    assert [others for _, others in _string_comparisons(tree)] == [["hp.advantage_estimator"]]


# ---- short trainer methods ------------------------------------------------------------------------

MAX_METHOD_LINES = 50


def test_no_trainer_method_over_50_lines():
    long = []
    for name, path, tree in _modules():
        if _part(name) != "rlhf_fast.trainers":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_METHOD_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "split these:\n" + "\n".join(long)


# ---- comments cite the repository's own docs --------------------------------------------------------

OUTSIDE = re.compile(r"\b(DESIGN|STYLE)(\.md)?\b( #\d+|, \")|\b(DESIGN|STYLE)\.md\b")


@pytest.mark.parametrize("folder", ["rlhf_fast", "kernels", "csrc", "tests", "benchmarks", "scripts"])
def test_no_citation_of_files_outside_the_repo(folder):
    hits = []
    for f in sorted((REPO / folder).rglob("*")):
        if f.suffix not in (".py", ".cpp", ".h", ".sh", ".md") or f.name == Path(__file__).name:
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "cite docs/architecture.md (or the file in the repo) instead:\n" + "\n".join(hits)


def test_architecture_doc_exists_and_names_the_layers():
    doc = (REPO / "docs" / "architecture.md").read_text()
    for part in ("_checks", "_registry", "reference", "ops", "algos", "models", "engine", "config", "trainers", "cli"):
        assert part in doc
