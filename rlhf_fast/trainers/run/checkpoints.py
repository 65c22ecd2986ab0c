"""Atomic checkpoints with ``--resume``, and the checks that refuse a resume with other settings.

Layout under a stage's output directory::

    DIR/checkpoints/step-000120/          model/ (HF format + tokenizer), deepspeed/ (engine state),
                                          trainer_state.json (written last)
    DIR/checkpoints/latest                name of the newest complete checkpoint

Checkpoints are written to ``checkpoints/.tmp-step-N`` and renamed into place, and ``latest`` is
replaced atomically after that: a run killed mid-save leaves the previous checkpoint as
``latest``, complete and loadable. Multi-node runs need ``DIR`` on a shared file system (as
DeepSpeed's own checkpoints do).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from rlhf_fast.trainers import deepspeed_setup as dss
from rlhf_fast.trainers.run.atomic_files import atomic_write_text, replace_dir

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"


# Fields that may change between a run and its resumption: where and how often it logs, evaluates and
# saves, and where it stops. Anything else would silently train another run from this one's state.
RESUMABLE_CHANGES = ("logging.", "stop_after_steps", "stop_after_iterations", "eval_batch_size")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _same_value(x, y) -> bool:
    """Equal, or two spellings of one existing path (runs/sft/model vs /abs/runs/sft/model: the
    pipeline fills model paths in from --output-dir as it was written)."""
    if x == y:
        return True
    if isinstance(x, str) and isinstance(y, str) and x and y:
        try:
            return os.path.samefile(x, y)
        except OSError:
            return False
    return False


def check_resume_config(saved: dict, current: dict, stage: str, path) -> None:
    """Raises when ``current`` differs from the config a checkpoint was written with (outside
    ``RESUMABLE_CHANGES``), naming the fields."""
    a, b = _flatten(saved), _flatten(current)
    diff = [k for k in sorted(set(a) | set(b))
            if not _same_value(a.get(k), b.get(k)) and not k.startswith(RESUMABLE_CHANGES)]
    if diff:
        shown = "; ".join(f"{stage}.{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now" for k in diff[:6])
        more = f" (and {len(diff) - 6} more)" if len(diff) > 6 else ""
        raise ValueError(f"--resume with a config that differs from the one checkpoint {path} was written with: "
                         f"{shown}{more}. Resume with the same settings, or start a new run in another --output-dir")


class Checkpointer:
    """Atomic checkpoints under ``root`` (see the module docstring). Every rank calls ``save`` and
    ``load`` (DeepSpeed state is per rank); rank 0 owns the directory moves."""

    def __init__(self, root: Path, *, keep: int, is_main: bool):
        self.root, self.keep, self.is_main = Path(root), keep, is_main

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint, or None (with a warning when ``latest`` names a
        checkpoint that is missing or incomplete: the run then starts from scratch)."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if (path / STATE_FILE).is_file():
            return path
        log.warning("%s names %s, which is missing or incomplete (no %s): nothing to resume from, starting "
                    "from scratch", pointer, path, STATE_FILE)
        return None

    def save(self, step: int, *, engine, save_model: Callable[[Path], None], state: dict) -> Path:
        name = f"step-{step:06d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dss.barrier()
        engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
        save_model(tmp / "model")  # every rank calls it (ZeRO-3 gathers); rank 0 writes
        if self.is_main:
            atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")  # last: marks it complete
            replace_dir(tmp, final)
            atomic_write_text(self.root / LATEST, name + "\n")
            self._prune(keep_name=name)
        dss.barrier()
        return final

    def load(self, path: Path, engine, *, stage: Optional[str] = None, config: Optional[dict] = None) -> dict:
        """Restores the engine (weights, optimizer, scheduler) and returns the trainer state. With
        ``stage`` / ``config`` (``to_dict`` of the stage's config), a checkpoint written by another
        stage or with other settings is refused before anything is loaded; a checkpoint that cannot
        be read is a ValueError naming it."""
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"checkpoint {path}: {STATE_FILE} cannot be read ({e})") from None
        if stage is not None and state.get("stage", stage) != stage:
            raise ValueError(f"checkpoint {path} was written by the {state['stage']!r} stage, not {stage!r}: "
                             "point --output-dir at this stage's own directory")
        if config is not None and "config" in state:
            check_resume_config(state["config"], config, stage or "", path)
        try:
            load_path, _ = engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        except Exception as e:  # a deleted / truncated file, another model shape: DeepSpeed or torch errors
            raise ValueError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {str(e)[:300]}); it is "
                             "incomplete or from another model. Remove it (and fix checkpoints/latest) or start "
                             "fresh without --resume") from None
        if load_path is None:
            raise ValueError(f"{path}: no DeepSpeed state to resume from")
        return state

    def _prune(self, keep_name: str) -> None:
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if self.keep <= 0:
            return
        done = sorted(p for p in self.root.glob("step-*") if (p / STATE_FILE).is_file())
        for old in done[: -self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(directory) -> Optional[Path]:
    """``DIR/checkpoints/latest`` when it names a complete checkpoint (one with its trainer state)."""
    pointer = Path(directory) / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / STATE_FILE).is_file() else None


def check_checkpoint_settings(checkpoint: Path, *, stage: str, config: dict) -> None:
    """The checks ``Checkpointer.load`` makes (the stage that wrote it, its settings), made before
    anything is built: a ValueError naming the fields."""
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {checkpoint}: {STATE_FILE} cannot be read ({e})") from None
    if state.get("stage", stage) != stage:
        raise ValueError(f"checkpoint {checkpoint} was written by the {state['stage']!r} stage, not {stage!r}: "
                         "point --output-dir at this stage's own directory")
    if "config" in state:
        check_resume_config(state["config"], config, stage, checkpoint)
