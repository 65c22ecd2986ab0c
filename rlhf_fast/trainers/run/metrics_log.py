"""What a run shows while it trains: ``DIR/metrics.jsonl`` (one JSON object per logged step:
``{"step": ..., "train/loss": ...}``), the same metrics as TensorBoard events under
``DIR/tensorboard/``, and the tqdm progress bar."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from rlhf_fast.trainers.run.atomic_files import atomic_write_text

log = logging.getLogger(__name__)


class MetricsLogger:
    """``DIR/metrics.jsonl`` (one JSON object per logged step) and TensorBoard, on rank 0 only.
    ``resume_from(step)`` drops the lines after ``step`` so a resumed run's file reads as if the
    run had never stopped."""

    def __init__(self, output_dir: Path, *, tensorboard: bool, enabled: bool):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb_dir = output_dir / "tensorboard" if tensorboard else None
        self._writer = None

    def resume_from(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(row) for row in _metric_rows(self.path) if row["step"] <= step]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        self._purge_step = step + 1

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        writer = self._tb()
        if writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, step)
            writer.flush()

    def log_text(self, tag: str, text: str, step: int) -> None:
        """A TensorBoard text entry (markdown) at ``step``; nothing without TensorBoard."""
        writer = self._tb() if self.enabled else None
        if writer is not None:
            writer.add_text(tag, text, step)
            writer.flush()

    def _tb(self):
        if self.tb_dir is None:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.tb_dir), purge_step=getattr(self, "_purge_step", None))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def _metric_rows(path: Path) -> list[dict]:
    """The rows of a metrics file. A run killed while appending leaves a partial last line: it is
    dropped (with a warning); a bad line anywhere else is a ValueError naming the file and line."""
    lines = [(i + 1, ln) for i, ln in enumerate(path.read_text().splitlines()) if ln.strip()]
    rows = []
    for k, (lineno, ln) in enumerate(lines):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError("not a metrics row (a JSON object with a step)")
        except ValueError as e:
            if k == len(lines) - 1:
                log.warning("%s line %d is incomplete (a run stopped while writing it): dropped", path, lineno)
                break
            raise ValueError(f"{path} line {lineno}: {e}") from None
        rows.append(row)
    return rows


def read_metrics(output_dir) -> list[dict]:
    """The rows of ``DIR/metrics.jsonl``."""
    path = Path(output_dir) / "metrics.jsonl"
    return _metric_rows(path) if path.exists() else []


def make_progress(total: int, initial: int, *, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)
