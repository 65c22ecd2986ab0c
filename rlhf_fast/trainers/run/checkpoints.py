"""Atomic, verified checkpoints with ``--resume``, and the checks that refuse a resume with other settings.

Layout under a stage's output directory::

    DIR/checkpoints/step-000120/          model/ (HF format + tokenizer), deepspeed/ (engine state),
                                          trainer_state.json, manifest.json (written last)
    DIR/checkpoints/latest                name of the newest complete checkpoint

Checkpoints are written to ``checkpoints/.tmp-step-N`` and renamed into place, and ``latest`` is
replaced atomically after that: a run killed mid-save leaves the previous checkpoint as
``latest``, complete and loadable. ``manifest.json`` (``manifest.py``: every file's size and
sha256) is written last; a checkpoint whose manifest is missing or does not match is skipped for
the previous one, with a warning naming the file (``newest_intact``). A save that fails (a full
disk: ENOSPC) removes its partial directory and stops the run with ``CheckpointWriteError``,
naming the checkpoint that stands. Multi-node runs need ``DIR`` on a shared file system (as
DeepSpeed's own checkpoints do).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

from rlhf_fast.trainers import deepspeed_setup as dss
from rlhf_fast.trainers.run.atomic_files import atomic_write_text, replace_dir
from rlhf_fast.trainers.run.manifest import MANIFEST, verify, write_manifest
from rlhf_fast.trainers.run.reshard import resharded, universal_loading
from rlhf_fast.trainers.run.stopping import CheckpointWriteError

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


_WARNED: set = set()


def newest_intact(root: Path, *, warn: bool = True) -> Optional[Path]:
    """The newest checkpoint under ``root`` (``DIR/checkpoints``) that matches its manifest: the one
    ``latest`` names, else (with a warning naming the file that fails) the next older ``step-*``
    one, and so on; None when ``latest`` is missing or no checkpoint up to it is intact."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    named = root / pointer.read_text().strip()
    older = sorted((p for p in root.glob("step-*") if p.is_dir() and p != named and _step_of(p) < _step_of(named)),
                   key=_step_of, reverse=True)
    for path in [named, *older]:
        problem = verify(path) if path.is_dir() else f"{path} is missing"
        if problem is None:
            return path
        if warn and (path, problem) not in _WARNED:  # once per process (the start decision and the load both ask)
            _WARNED.add((path, problem))
            log.warning("checkpoint %s is skipped: %s; trying the previous one", path, problem)
    return None


# Fields that may change between a run and its resumption: where and how often it logs, evaluates and
# saves, and where it stops. Anything else would silently train another run from this one's state.
RESUMABLE_CHANGES = ("logging.", "stop_after_steps", "stop_after_iterations", "eval_batch_size", "deepspeed.timeout_s")


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


def _is_write_error(e: BaseException) -> bool:
    """An OSError, or the RuntimeError torch.save's C++ writer raises for one ("PytorchStreamWriter
    failed writing file ...: file write failed")."""
    return isinstance(e, OSError) or "write" in str(e).lower()


class Checkpointer:
    """Atomic checkpoints under ``root`` (see the module docstring). Every rank calls ``save`` and
    ``load`` (DeepSpeed state is per rank); rank 0 owns the directory moves."""

    def __init__(self, root: Path, *, keep: int, is_main: bool):
        self.root, self.keep, self.is_main = Path(root), keep, is_main

    def latest(self) -> Optional[Path]:
        """The newest intact checkpoint, or None (``newest_intact``: a checkpoint that fails its
        manifest is skipped, with a warning naming the file)."""
        return newest_intact(self.root)

    def save(self, step: int, *, engine, save_model: Callable[[Path], None], state: dict) -> Path:
        """Writes checkpoint ``step`` (every rank; see the module docstring); a failed write raises
        ``CheckpointWriteError`` on every rank and leaves the previous checkpoint as the newest."""
        name = f"step-{step:06d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dss.barrier()
        failure = None
        try:
            engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
            save_model(tmp / "model")  # every rank calls it (ZeRO-3 gathers); rank 0 writes
            if self.is_main:
                state = {**state, "world_size": dss.world_size()}  # another one resumes through reshard.py
                atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")
                write_manifest(tmp)  # last: marks it complete
        except (OSError, RuntimeError) as e:  # ENOSPC, EDQUOT, EIO: the previous checkpoint stays the newest
            if not _is_write_error(e):
                raise
            failure = e
        self._agree_saved(failure, tmp, final)
        if self.is_main:
            replace_dir(tmp, final)
            try:
                atomic_write_text(self.root / LATEST, name + "\n")
            except OSError as e:
                raise CheckpointWriteError(f"checkpoint {final} was written but {self.root / LATEST} could not be "
                                           f"updated ({e}); --resume continues from the checkpoint it names") from e
            self._prune(keep_name=name)
        dss.barrier()
        return final

    def _agree_saved(self, failure: Optional[OSError], tmp: Path, final: Path) -> None:
        """Raises ``CheckpointWriteError`` on every rank when the save failed on any rank, after
        removing the partial directory (it would fill the disk further; it was never ``latest``)."""
        if not dss.any_rank(failure is not None):
            return
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = newest_intact(self.root, warn=False)
        what = f"{type(failure).__name__}: {str(failure)[:300]}" if failure is not None else "it failed on another rank"
        try:
            what += f"; {shutil.disk_usage(self.root).free / 2**20:.0f} MiB free there now"
        except OSError:
            pass
        stands = f"the previous checkpoint {previous} is intact and --resume continues from it" if previous \
            else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"checkpoint {final} could not be written ({what}); its partial files were removed "
                                   f"and {stands}. Free space under {self.root} (or lower logging.keep_checkpoints) "
                                   "and run again") from failure

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
        universal = resharded(path, saved_world_size=state.get("world_size"), world_size=dss.world_size(),
                              is_main=self.is_main)
        engines = list(engine.engines.values()) if hasattr(engine, "engines") else [engine]  # PPO: policy, critic
        try:
            with universal_loading(engines) if universal is not None else contextlib.nullcontext():
                load_path, _ = engine.load_checkpoint(str(universal or path / "deepspeed"), tag="state",
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
        except Exception as e:  # a deleted / truncated file, another model shape: DeepSpeed or torch errors
            raise ValueError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {str(e)[:300]}); it is "
                             "incomplete or from another model. Remove it (and fix checkpoints/latest) or start "
                             "fresh without --resume") from None
        if load_path is None:
            raise ValueError(f"{path}: no DeepSpeed state to resume from")
        return state

    def _prune(self, keep_name: str) -> None:
        for stale in [*self.root.glob(".tmp-step-*"), *self.root.glob(".universal-step-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        if self.keep <= 0:
            return
        done = sorted(p for p in self.root.glob("step-*") if (p / MANIFEST).is_file())
        for old in done[: -self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(directory, *, warn: bool = True) -> Optional[Path]:
    """The newest intact checkpoint of the run in ``directory`` (``newest_intact`` of
    ``DIR/checkpoints``), or None."""
    return newest_intact(Path(directory) / "checkpoints", warn=warn)


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
