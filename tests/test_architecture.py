"""The architecture's rules, checked statically from the source (docs/architecture.md):

- imports only run downward through the layers
  ``_checks -> reference (op oracles) -> kernels / _csrc -> ops -> algos / models / engine / data /
  tasks -> config -> trainers -> cli`` (function-level imports included);
- ``trainers/`` compares no variant name: a config value that selects a variant goes through a
  registry or table entry that says what the variant needs, never through ``x == "name"``;
- no import cycles among the package's modules (function-level imports included);
- inside ``trainers/``, run management (``trainers/run/``) imports no stage, and only the float64
  twins themselves import the float64 twins (``trainers/parity/``);
- every package of ``rlhf_fast/`` is listed in pyproject's ``packages`` (else the wheel lacks it);
- no trainer method is longer than ~50 lines; no module is longer than 600 lines;
- code comments cite files inside the repository, never the design notes outside it (a markdown file
  they name must be one of the repository's).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: source folder -> the package it is importable as (pyproject's package-dir)
ROOTS = {"rlhf_fast": "rlhf_fast", "kernels": "rlhf_fast.kernels", "csrc": "rlhf_fast._csrc"}
#: layer of each top-level part of the package; a module may import its own layer or lower ones
LAYERS = {
    "rlhf_fast": 0, "rlhf_fast._checks": 0, "rlhf_fast._rlmath_checks": 0, "rlhf_fast._registry": 0,
    "rlhf_fast._filter": 0, "rlhf_fast._threads": 0, "rlhf_fast._malloc": 0, "rlhf_fast._source_folders": 0,
    "rlhf_fast.reference": 1, "rlhf_fast.testing": 1,
    "rlhf_fast.kernels": 2, "rlhf_fast._csrc": 2,
    "rlhf_fast.ops": 3,
    "rlhf_fast.algos": 4, "rlhf_fast.models": 4, "rlhf_fast.engine": 4, "rlhf_fast.data": 4, "rlhf_fast.tasks": 4,
    "rlhf_fast.envs": 4,
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


# ---- no import cycles ------------------------------------------------------------------------------


def _import_graph(modules) -> dict[str, set[str]]:
    """module -> the package modules it imports (function-level imports included). ``from pkg import
    x`` imports the submodule ``pkg.x`` when there is one, else ``pkg`` itself; an import of a name
    inside a module (``rlhf_fast.ops.rlmath.gae``) counts as an import of that module."""
    trees = {name: tree for name, _, tree in modules}
    graph = {}
    for name, tree in trees.items():
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in trees else node.module
                         for a in node.names]
            else:
                continue
            for target in found:
                while target and target not in trees:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import cycle (``[a, b, ..., a]``) per strongly connected group of modules."""
    order, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(v):  # Tarjan's strongly connected components
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in order:
            visit(v)
    cycles = []
    for group in groups:  # a shortest way from the group's first module back to itself
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(graph[path[-1]] & group)
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def test_no_import_cycles():
    cycles = _cycles(_import_graph(_modules()))
    assert not cycles, ("import cycles (a function-level import hides one; move the shared piece into a module "
                        "both import):\n" + "\n".join(" -> ".join(c) for c in cycles))


def test_the_cycle_check_catches_one():
    """The check itself: the old cycle between the stage loop and the run guard
    (``trainers.stage_loop <-> trainers.run.guard``), hidden by a function-level import in the guard."""
    modules = [("rlhf_fast.trainers.stage_loop", None, ast.parse("from rlhf_fast.trainers.run.guard import guarded_fit\n")),
               ("rlhf_fast.trainers.run.guard", None,
                ast.parse("def f():\n    from rlhf_fast.trainers.stage_loop import LATEST\n"))]
    assert _cycles(_import_graph(modules)) == [["rlhf_fast.trainers.run.guard", "rlhf_fast.trainers.stage_loop",
                                                "rlhf_fast.trainers.run.guard"]]  # named from its first module by name


# ---- trainers' subpackages ---------------------------------------------------------------------------

#: what run management (``trainers/run/``) may import from ``trainers/``: itself and the distributed
#: set-up (ranks, barriers); no stage (docs/architecture.md, "How `trainers/` is divided")
RUN_MAY_IMPORT = ("rlhf_fast.trainers.run", "rlhf_fast.trainers.deepspeed_setup")


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _subpackage_violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _inside(name, "rlhf_fast.trainers.run") and _inside(target, "rlhf_fast.trainers") \
                    and not any(_inside(target, p) for p in RUN_MAY_IMPORT):
                found.append(f"{name} (run management) imports {target}")
            if _inside(target, "rlhf_fast.trainers.parity") and not _inside(name, "rlhf_fast.trainers.parity"):
                found.append(f"{name} imports the float64 twin {target}")
    return found


def test_trainers_subpackages_point_one_way():
    found = _subpackage_violations(_import_graph(_modules()))
    assert not found, "docs/architecture.md, \"How `trainers/` is divided\":\n" + "\n".join(found)


def test_the_subpackage_check_catches_one():
    graph = {"rlhf_fast.trainers.run.guard": {"rlhf_fast.trainers.stage_loop", "rlhf_fast.trainers.deepspeed_setup"},
             "rlhf_fast.trainers.ppo": {"rlhf_fast.trainers.parity.ppo_reference"},
             "rlhf_fast.trainers.parity.preset_vs_upstream": {"rlhf_fast.trainers.parity.ppo_reference"}}
    assert _subpackage_violations(graph) == [
        "rlhf_fast.trainers.ppo imports the float64 twin rlhf_fast.trainers.parity.ppo_reference",
        "rlhf_fast.trainers.run.guard (run management) imports rlhf_fast.trainers.stage_loop"]


def test_every_package_ships_in_the_wheel():
    """pyproject lists the packages by name (``kernels/`` and ``csrc/`` need ``package-dir``), so a new
    subpackage (``trainers/run/``) is left out of the wheel unless it is added there too."""
    text = (REPO / "pyproject.toml").read_text()
    listed = set(re.findall(r'"(rlhf_fast[\w.]*)"', re.search(r"^packages = \[(.*?)\]", text, re.S | re.M).group(1)))
    packages = {".".join(f.parent.relative_to(REPO).parts) for f in (REPO / "rlhf_fast").rglob("__init__.py")}
    assert not packages - listed, f"add to pyproject.toml's packages: {sorted(packages - listed)}"


# ---- no long modules --------------------------------------------------------------------------------

MAX_MODULE_LINES = 600
#: modules allowed past the limit for now, each with its reason
LONG_MODULE_EXCEPTIONS: dict[str, str] = {}


def test_no_module_over_600_lines():
    files = [f for root, pattern in (("rlhf_fast", "*.py"), ("kernels", "*.py"), ("csrc", "*.cpp"), ("csrc", "*.h"))
             for f in sorted((REPO / root).rglob(pattern))]
    long = [f"{f.relative_to(REPO)}: {n} lines" for f in files
            if (n := len(f.read_text().splitlines())) > MAX_MODULE_LINES
            and str(f.relative_to(REPO)) not in LONG_MODULE_EXCEPTIONS]
    assert not long, "split these by concern (docs/architecture.md, \"Conventions\"):\n" + "\n".join(long)


def test_long_module_exceptions_are_still_needed():
    """An exception is dropped as soon as its file is short enough (or gone)."""
    stale = [p for p in LONG_MODULE_EXCEPTIONS
             if not (REPO / p).is_file() or len((REPO / p).read_text().splitlines()) <= MAX_MODULE_LINES]
    assert not stale, f"remove these from LONG_MODULE_EXCEPTIONS: {stale}"


# ---- trainers compare no variant name ------------------------------------------------------------

#: string comparisons in trainers/ that select no config variant: metric keys, the device type, a
#: metrics prefix, the reserved reward-function spec "task:gold", the start decision's internal state
#: (trainers/run/guard.py), the launcher's RANK variable
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

#: the design notes kept outside the repository, by name: "DESIGN #3", "STYLE, \"...\"", "RLHF_DETAILS.md",
#: "see DEVELOPERS"
OUTSIDE = re.compile(r"\b(DESIGN|STYLE)(\.md)?\b( #\d+|, \")|\b(DESIGN|STYLE)\.md\b|\b(RLHF_DETAILS|DEVELOPERS)\b")
#: a markdown file named in a line (``benchmarks/PEERS.md``, ``../NOTES.md``): it must be one of the repo's
MARKDOWN = re.compile(r"([\w-]+\.md)\b")


def _repo_markdown_names() -> set[str]:
    names = set()
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("node_modules", "build", "dist")]
        names.update(f for f in files if f.endswith(".md"))
    return names


def _outside_citations(line: str, repo_markdown: set[str]) -> list[str]:
    found = [m.group(0) for m in OUTSIDE.finditer(line)]
    return found + [name for name in MARKDOWN.findall(line) if name not in repo_markdown]


@pytest.mark.parametrize("folder", ["rlhf_fast", "kernels", "csrc", "tests", "benchmarks", "scripts"])
def test_no_citation_of_files_outside_the_repo(folder):
    hits, repo_markdown = [], _repo_markdown_names()
    for f in sorted((REPO / folder).rglob("*")):
        if f.suffix not in (".py", ".cpp", ".h", ".sh", ".md") or f.name == Path(__file__).name:
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if _outside_citations(line, repo_markdown):
                hits.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "cite docs/architecture.md (or the file in the repo) instead:\n" + "\n".join(hits)


@pytest.mark.parametrize("line", [
    "written from their semantics (RLHF_DETAILS.md lists the pinned snapshots)",
    "(see RLHF_DETAILS for the snapshots)",
    "# DESIGN #7: the EOS trick",
    "as STYLE.md asks",
    "see DEVELOPERS for the set-up",
    "see ../NOTES.md",
])
def test_the_citation_check_catches_one(line):
    assert _outside_citations(line, {"README.md", "architecture.md"})


def test_the_citation_check_passes_the_repos_own_files():
    assert not _outside_citations("docs/architecture.md \"Layers\"; benchmarks/README.md", _repo_markdown_names())


def test_architecture_doc_exists_and_names_the_layers():
    doc = (REPO / "docs" / "architecture.md").read_text()
    for part in ("_checks", "_registry", "reference", "ops", "algos", "models", "engine", "config", "trainers", "cli"):
        assert part in doc


# ---- no module compares a registered variant's name ---------------------------------------------


def _registered_names() -> dict[str, set[str]]:
    """Every name registered in a ``Registry`` of the package (imported), by the registry's kind."""
    import importlib
    import pkgutil

    import rlhf_fast
    from rlhf_fast._registry import Registry

    kinds: dict[str, set[str]] = {}
    for info in pkgutil.walk_packages(rlhf_fast.__path__, "rlhf_fast."):
        if info.name.startswith("rlhf_fast.kernels"):  # Triton kernels: imported on CUDA only
            continue
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, Registry):
                kinds.setdefault(obj.kind, set()).update(obj.names())
    return kinds


def test_no_module_compares_a_registered_variant_name():
    """Anywhere in the package, ``x == "name"`` / ``x in ("a", "b")`` with a name some registry
    holds is a variant chosen by name outside its registry (use the entry's attributes instead).
    Module-level registration (``REG.register("name")``) is not a comparison and is not flagged."""
    names = {n: kind for kind, ns in _registered_names().items() for n in ns}
    # strings that are a registered name by coincidence: YAML's spelling of null, a saved model's kind
    coincidences = {("rlhf_fast/config/core.py", "none"), ("rlhf_fast/models/policy.py", "policy"),
                    ("rlhf_fast/models/reward.py", "policy")}
    assert {"gae", "ppo_clip", "hybrid", "eager", "value_head", "bf16", "cosine", "recompute"} <= names.keys()
    found = []
    for name, path, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            for operand in [node.left, *node.comparators]:
                elts = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                hit = [e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
                       and e.value in names and (str(path.relative_to(REPO)), e.value) not in coincidences]
                if hit:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)} "
                                 f"({', '.join(f'{h!r} is a {names[h]}' for h in hit)})")
    assert not found, "registered variant names compared outside their registry:\n" + "\n".join(found)
