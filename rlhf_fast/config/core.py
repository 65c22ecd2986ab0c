"""The machinery: typed coercion and validation, dotted paths and overrides, presets and YAML
files, the batch plan, and field documentation."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import os
import textwrap
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from rlhf_fast.config.constraints import CHECKS, cross_checks
from rlhf_fast.config.presets import PRESETS
from rlhf_fast.config.stages import RunConfig


# ---- typed values ------------------------------------------------------------------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
            list: "a list of strings"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(value, tp, path: str):
    """``value`` (from YAML or a command line) as type ``tp``; ValueError naming ``path`` otherwise."""

    def bad():
        return ValueError(f"{path}: expected {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:  # 1 == True in Python: a bool choice takes a bool value only
            if value == choice and isinstance(value, bool) == isinstance(choice, bool):
                return choice
        raise ValueError(f"{path}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(tp)):
            raise bad()
        return tuple(_coerce(v, t, path) for v, t in zip(value, typing.get_args(tp)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        try:  # PyYAML reads "3e-6" (no dot) as a string: accept any float literal
            out = float(value)
        except (TypeError, ValueError):
            raise bad() from None
        if not math.isfinite(out):
            raise bad()
        return out
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if tp is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if not value.strip().startswith("[") else yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{path}: expected a list of strings, got {value!r}")
        return list(value)
    if tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    raise TypeError(f"{path}: unsupported field type {tp!r}")


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _check_value(cls, name: str, value, path: str) -> None:
    check = CHECKS.get((cls, name))
    if check is not None and not check[0](value):
        raise ValueError(f"{path}: expected {check[1]}, got {value!r}")


def from_dict(cls, data: Optional[dict], path: str = ""):
    """A ``cls`` instance from a nested dict (YAML), every value type-checked; unknown keys and
    bad values are ValueErrors naming the dotted path."""
    obj = cls()
    if data:
        update(obj, data, path)
    validate(obj, path)
    return obj


def update(obj, data: dict, path: str = "") -> None:
    """Applies a nested dict of values to a config object in place; each value is type- and
    range-checked; constraints between fields are left to ``validate`` (call it once all values
    are in, so that e.g. batch_size and micro_batch_size can change together)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping of fields, got {data!r}")
    cls = type(obj)
    hints = _hints(cls)
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ValueError(f"unknown field {sub!r}; {type(obj).__name__} has: {', '.join(hints)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            update(getattr(obj, key), {} if value is None else value, sub)  # "ppo:" with nothing under it
        else:
            setattr(obj, key, _coerce(value, tp, sub))
            _check_value(cls, key, getattr(obj, key), sub)


def validate(obj, path: str = "") -> None:
    """Checks every field's range and the constraints between fields (recursively)."""
    for f in dataclasses.fields(obj):
        sub = f"{path}.{f.name}" if path else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, sub)
        else:
            _check_value(type(obj), f.name, value, sub)
    cross_checks(obj, path or type(obj).__name__)


def to_dict(obj) -> dict:
    """Nested plain dict (tuples as lists), ready for YAML / JSON."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}


# ---- dotted paths and overrides ------------------------------------------------------------------


def _leaf_paths(cls, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _hints(cls).items():
        p = f"{prefix}.{name}" if prefix else name
        out.extend(_leaf_paths(tp, p) if dataclasses.is_dataclass(tp) else [p])
    return out


def resolve_path(root_cls, dotted: str) -> str:
    """The full dotted path of a field. Exact paths pass through; ``rm.lr`` becomes ``rm.optim.lr``
    when exactly one field named ``lr`` lives under ``rm``. ValueError (with close matches) otherwise."""
    leaves = _leaf_paths(root_cls)
    if dotted in leaves:
        return dotted
    head, _, leaf = dotted.rpartition(".")
    candidates = [p for p in leaves if p.startswith(f"{head}.") and p.rsplit(".", 1)[-1] == leaf] if head else []
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise ValueError(f"ambiguous field {dotted!r}: could be {', '.join(candidates)}")
    near = [p for p in leaves if p.rsplit(".", 1)[-1] == leaf]
    if near:
        raise ValueError(f"unknown field {dotted!r}; did you mean {', '.join(near)}?")
    cls, known = root_cls, []
    for part in dotted.split(".")[:-1]:  # the deepest section that exists, to list its fields
        tp = _hints(cls).get(part)
        if not dataclasses.is_dataclass(tp):
            break
        cls, known = tp, known + [part]
    where = ".".join(known) or "the top level"
    raise ValueError(f"unknown field {dotted!r}; {where} has: {', '.join(_hints(cls))}")


def set_path(obj, dotted: str, value) -> None:
    """Sets one (possibly shortened) dotted field from a YAML-ish value or string (type- and
    range-checked; call ``validate`` after the last one)."""
    full = resolve_path(type(obj), dotted)
    nested: dict = {}
    cursor = nested
    parts = full.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = _parse_scalar(value)
    update(obj, nested)


def _parse_scalar(value):
    if isinstance(value, str):
        try:
            return yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            return value
    return value


def parse_overrides(argv: list[str], *, default_section: Optional[str] = None, root_cls=None) -> list[tuple[str, str]]:
    """``["--rm.lr", "3e-6", "--sft.deepspeed.zero_stage=2"]`` -> ``[("rm.lr", "3e-6"), ...]``.
    A path that does not start with a section of ``root_cls`` gets ``default_section.`` in front
    (so ``rlhf-fast sft --lr 1e-4`` works)."""
    root_cls = root_cls or RunConfig
    sections = set(_hints(root_cls))
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected an override like --rm.lr 3e-6, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"override --{key} has no value")
            value, i = argv[i + 1], i + 1
        if default_section and key.split(".", 1)[0] not in sections:
            key = f"{default_section}.{key}"
        out.append((key, value))
        i += 1
    return out


# ---- presets, files, the one entry point -----------------------------------------------------------


def apply_preset(cfg: RunConfig, name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    for key, value in PRESETS[name].items():
        set_path(cfg, key, value)


def load_yaml(path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {str(path)!r} is a directory, not a YAML file")
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def load_config(
    path: Optional[os.PathLike | str] = None,
    *,
    presets: typing.Sequence[str] = (),
    overrides: typing.Sequence[str] | typing.Sequence[tuple[str, Any]] = (),
    default_section: Optional[str] = None,
) -> RunConfig:
    """Defaults <- YAML file <- presets (in order) <- overrides (in order). A YAML file may name
    its own presets in a top-level ``presets:`` list (applied before its other keys... and before
    the presets given here)."""
    cfg = RunConfig()
    data = load_yaml(path) if path is not None else {}
    file_presets = data.pop("presets", None) or []
    if isinstance(file_presets, str):  # "presets: ci" means the one preset, not the letters c, i
        file_presets = [file_presets]
    for name in file_presets:
        apply_preset(cfg, name)
    update(cfg, data)
    for name in presets:
        apply_preset(cfg, name)
    pairs = overrides
    if overrides and isinstance(overrides[0], str):
        pairs = parse_overrides(list(overrides), default_section=default_section)
    for key, value in pairs:
        set_path(cfg, key, value)
    validate(cfg)
    return cfg


def dump_yaml(cfg) -> str:
    """YAML of a config object, or of a plain dict (e.g. ``{"sft": to_dict(cfg.sft)}``)."""
    return yaml.safe_dump(cfg if isinstance(cfg, dict) else to_dict(cfg), sort_keys=False)


# ---- derived values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """The batch geometry of one stage for one world size, computed once.

    batch_size: global sequences (pairs) per optimizer step. micro_batch_size: per forward on one
    rank. grad_accum: micro-batches per optimizer step per rank. world_size: data-parallel ranks.
    """

    batch_size: int
    micro_batch_size: int
    grad_accum: int
    world_size: int

    @classmethod
    def resolve(cls, stage, world_size: int, path: str = "") -> "BatchPlan":
        """From a stage config (``batch_size``, ``micro_batch_size``, ``deepspeed.grad_accum``)."""
        per_step = stage.micro_batch_size * world_size
        accum = stage.deepspeed.grad_accum
        if accum is None:
            if stage.batch_size % per_step:
                raise ValueError(
                    f"{path}batch_size ({stage.batch_size}) must be a multiple of micro_batch_size x world size "
                    f"({stage.micro_batch_size} x {world_size} = {per_step})"
                )
            accum = stage.batch_size // per_step
        elif accum * per_step != stage.batch_size:
            raise ValueError(
                f"{path}deepspeed.grad_accum ({accum}) x micro_batch_size ({stage.micro_batch_size}) x world size "
                f"({world_size}) = {accum * per_step}, but batch_size is {stage.batch_size}"
            )
        return cls(stage.batch_size, stage.micro_batch_size, accum, world_size)


# ---- field documentation (for --help) ----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a config dataclass (read from its source); a subclass
    (``PPOLoggingConfig``) inherits its bases' docs and may restate a field with its own."""
    docs = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update(field_docs(base))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return docs
    body = tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe(cfg=RunConfig) -> list[tuple[str, Any, str]]:
    """(dotted path, value, doc) for every leaf field: the defaults of a config class, or the
    values of a config instance (e.g. one resolved from presets and overrides)."""
    return list(_describe_obj(cfg() if isinstance(cfg, type) else cfg, ""))


def _describe_obj(obj, prefix: str):
    for f in dataclasses.fields(obj):
        p = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _describe_obj(value, p)
        else:
            yield p, value, field_docs(type(obj)).get(f.name, "")
