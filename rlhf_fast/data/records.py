"""Raw records from JSONL files, local Hugging Face ``datasets`` directories or in-memory dicts,
each remembering where it came from so that a bad record's error names its file and line."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

RecordSource = Union[str, os.PathLike, Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class Record:
    """One example. ``origin`` reads like ``data/train.jsonl line 12`` or
    ``data/prefs [train] row 3`` and prefixes every error about this record."""

    data: Mapping[str, Any]
    origin: str

    def text(self, field: str, *, allow_empty: bool = False) -> str:
        """The string in ``field``; ValueError naming the origin and the field when it is
        missing, not a string, or empty (whitespace only)."""
        if field not in self.data:
            present = ", ".join(repr(k) for k in self.data) or "none"
            raise ValueError(f"{self.origin}: missing field {field!r} (fields present: {present})")
        value = self.data[field]
        if not isinstance(value, str):
            raise ValueError(f"{self.origin}: field {field!r} must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise ValueError(f"{self.origin}: field {field!r} is empty")
        return value


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            records.append(Record(obj, f"{path} line {lineno}"))
    return records


def _read_hf_dir(path: Path, split: str | None) -> list[Record]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    label = str(path)
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise ValueError(f"{path} holds splits {sorted(ds)}; pass split=")
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(f"{path} has no split {split!r}; splits: {sorted(ds)}")
        ds = ds[split]
        label = f"{path} [{split}]"
    return [Record(row, f"{label} row {i}") for i, row in enumerate(ds)]


def load_records(source: RecordSource, *, split: str | None = None) -> list[Record]:
    """Records from a ``.jsonl`` file (one JSON object per line; blank lines skipped), a
    directory written by ``datasets.Dataset(Dict).save_to_disk`` (``split`` picks one of a
    DatasetDict's splits; it is ignored for a single Dataset), or a list of dicts. Nothing is downloaded."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            return _read_hf_dir(path, split)
        if path.is_file():
            return _read_jsonl(path)
        raise ValueError(f"data source {str(source)!r} is neither a JSONL file nor a local datasets directory")
    if isinstance(source, Iterable):
        out = []
        for i, obj in enumerate(source):
            if isinstance(obj, Record):
                out.append(obj)
            elif isinstance(obj, Mapping):
                out.append(Record(obj, f"record {i}"))
            else:
                raise ValueError(f"record {i}: expected a dict, got {type(obj).__name__}")
        return out
    raise ValueError(f"data source must be a path or a list of dicts, got {type(source).__name__}")


def write_jsonl(path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Writes dicts as JSON lines (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
