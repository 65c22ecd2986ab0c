"""Plumbing shared by every stage (SFT, reward model, PPO): data order and sharding, metrics
(``DIR/metrics.jsonl`` + TensorBoard + a tqdm bar), atomic checkpoints with ``--resume``, the
``StageTrainer`` loop every stage runs and the ``DatasetStageTrainer`` that SFT and the reward
model fill in with a model, datasets and a loss.

Output directory layout::

    DIR/config.yaml                       the stage's resolved config
    DIR/metrics.jsonl                     one JSON object per logged step: {"step": ..., "train/loss": ...}
    DIR/tensorboard/                      the same metrics as TensorBoard events
    DIR/checkpoints/step-000120/          model/ (HF format + tokenizer), deepspeed/ (engine state),
                                          trainer_state.json (written last)
    DIR/checkpoints/latest                name of the newest complete checkpoint
    DIR/model/                            the final model (HF format + tokenizer)
    DIR/.rlhf_fast.lock                   the lock of the run using DIR (``rlhf_fast.trainers.runs``)

Checkpoints are written to ``checkpoints/.tmp-step-N`` and renamed into place, and ``latest`` is
replaced atomically after that: a run killed mid-save leaves the previous checkpoint as
``latest``, complete and loadable. Multi-node runs need ``DIR`` on a shared file system (as
DeepSpeed's own checkpoints do). ``fit`` refuses a ``DIR`` that holds an earlier run unless it
resumes or overwrites it, and locks ``DIR`` while it runs (``rlhf_fast.trainers.runs``).

Exactness: a loss is a sum over units (tokens or pairs) divided by the number of units in the
whole global batch, so 1 rank with 2 micro-batches and 2 ranks with 1 each compute the same
gradient up to summation order. Data order depends on the seed and epoch only (never on the rank
or world size); a resumed run skips the batches it has done, so it repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from rlhf_fast import config as config_mod
from rlhf_fast.config import BatchPlan, LoggingConfig
from rlhf_fast.trainers import _build
from rlhf_fast.trainers import deepspeed_setup as dss
from rlhf_fast.trainers.packing import contiguous_token_micro
from rlhf_fast.trainers.runs import guarded_fit, previous_run, resolve_save_every, stop_requested

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"


# ---- data order -------------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of one epoch: a permutation seeded by (seed, epoch), the same on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def rank_micro_batches(global_batch: Sequence[int], plan: BatchPlan, rank: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch: rank r takes the r-th contiguous slice of
    ``batch_size / world_size`` examples and cuts it into ``grad_accum`` micro-batches."""
    per_rank = plan.batch_size // plan.world_size
    mine = list(global_batch[rank * per_rank : (rank + 1) * per_rank])
    m = plan.micro_batch_size
    return [mine[i : i + m] for i in range(0, per_rank, m)]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return n // batch_size  # the last, incomplete global batch of an epoch is dropped


def total_steps_of(n: int, batch_size: int, epochs: float, max_steps: Optional[int]) -> int:
    per_epoch = steps_per_epoch(n, batch_size)
    if per_epoch == 0:
        raise ValueError(f"the training set has {n} examples, fewer than one global batch ({batch_size})")
    return max_steps if max_steps is not None else max(1, int(round(epochs * per_epoch)))


# ---- metrics --------------------------------------------------------------------------------------


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
        _atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
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


# ---- checkpoints ------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Moves a finished directory into place; an existing one is moved aside first, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
            _atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2) + "\n")  # last: marks it complete
            _replace_dir(tmp, final)
            _atomic_write_text(self.root / LATEST, name + "\n")
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


def start_fresh(output_dir: Path, checkpointer: Checkpointer, *, is_main: bool) -> None:
    """A run that does not resume starts in a directory without an earlier run: ``fit``'s guard
    (``rlhf_fast.trainers.runs.guarded_fit``) refused one, or deleted it under ``overwrite``, before
    anything was built. Checked again here for a caller that set up a trainer without ``fit``;
    nothing is ever deleted here (an earlier run's checkpoints would mix into a later ``--resume``)."""
    found = previous_run(output_dir)
    if found:
        raise ValueError(f"{output_dir} holds a previous run ({', '.join(found)}): resume it, overwrite it "
                         "(overwrite=True / --overwrite) or choose another output directory")
    dss.barrier()


def write_stage_config(output_dir: Path, stage: str, cfg) -> None:
    """``DIR/config.yaml``: the stage's resolved config under its section (``sft:``...), so that
    ``--config DIR/config.yaml`` reproduces the run."""
    _atomic_write_text(output_dir / "config.yaml", config_mod.dump_yaml({stage: config_mod.to_dict(cfg)}))


def save_model_atomically(directory: Path, write: Callable[[Path], None], *, is_main: bool) -> None:
    """Writes a model directory through a temporary sibling and a rename (rank 0 writes)."""
    if not is_main:
        return
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    _replace_dir(tmp, directory)


# ---- the stage loop ----------------------------------------------------------------------------------


class StageTrainer:
    """The loop every stage runs (docs/architecture.md, "Stages"): set-up, then a fresh start or a
    resume from the newest checkpoint, then steps with evaluation, logging and checkpoints, then
    the final model through a temporary directory and a rename (ZeRO-3 gathered). A stage fills in:

    ``setup_stage`` builds data, models and engines (sets ``self.engine``, the trained module's
    engine, whose module ``write_model`` saves); ``loop_length`` the number of steps; ``run_step``
    one step's metrics row; ``evaluate``; ``stop_after`` (a config's ``stop_after_*``). Optional:
    ``begin`` (step-0 work, logged at step 0; a resumed run skips it), ``finish`` (extra final
    metrics), ``checkpoint_engine`` (several engines under one checkpoint), ``trainer_state`` /
    ``load_trainer_state`` (what a checkpoint keeps besides the engines), ``progress_postfix``,
    ``on_complete`` (after the final model is written), ``log_every_step``.
    """

    stage = "stage"
    log_every_step = False
    """Log every step (PPO: an iteration is long and its row is the learning curve) instead of every
    ``logging.log_every`` steps."""

    def __init__(self, cfg, output_dir, *, resume: bool = False, overwrite: bool = False,
                 dist_info: Optional[dss.DistInfo] = None):
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.resume, self.overwrite = resume, overwrite
        self.dist = dist_info or dss.init_distributed(cfg.deepspeed.backend)
        self.is_main = self.dist.is_main

    # -- hooks ---------------------------------------------------------------------------------------
    def setup_stage(self) -> None:
        raise NotImplementedError

    def loop_length(self) -> int:
        raise NotImplementedError

    def stop_after(self) -> Optional[int]:
        raise NotImplementedError

    def run_step(self) -> dict:
        """Step ``self.step`` (0-based); returns its metrics row."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def write_model(self, module, directory: Path) -> None:
        raise NotImplementedError

    def begin(self) -> dict:
        """Runs once, before the first optimizer step, and only when the run starts at step 0: a
        resumed run skips it, so what it sets must live in the checkpoint (module buffers do)."""
        return {}

    def finish(self) -> dict:
        return {}

    def checkpoint_engine(self):
        return self.engine

    def trainer_state(self) -> dict:
        return {}

    def load_trainer_state(self, state: dict) -> None:
        pass

    def progress_postfix(self, row: dict) -> dict:
        return {}

    def on_complete(self) -> None:
        pass

    # -- helpers ---------------------------------------------------------------------------------------
    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.dist.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def save_model(self, directory: Path) -> None:
        """HF-format save of the engine's module; every rank calls it (ZeRO-3 gathers the
        partitioned parameters), rank 0 writes."""
        module = self.engine.module
        with dss.full_parameters(module, self.cfg.deepspeed.zero_stage):
            if self.is_main:
                self.write_model(module, directory)

    def _setup(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.setup_stage()
        log: LoggingConfig = self.cfg.logging
        self.checkpointer = Checkpointer(self.output_dir / "checkpoints", keep=log.keep_checkpoints, is_main=self.is_main)
        self.logger = MetricsLogger(self.output_dir, tensorboard=log.tensorboard, enabled=self.is_main)
        self.step = 0
        if self.resume and (ckpt := self.checkpointer.latest()) is not None:
            state = self.checkpointer.load(ckpt, self.checkpoint_engine(), stage=self.stage,
                                           config=config_mod.to_dict(self.cfg))
            self.step = int(state["step"] if "step" in state else state["iteration"])
            self.load_trainer_state(state)
            self.logger.resume_from(self.step)
        else:
            start_fresh(self.output_dir, self.checkpointer, is_main=self.is_main)
        if self.is_main:
            write_stage_config(self.output_dir, self.stage, self.cfg)

    def _checkpoint(self) -> None:
        self.checkpointer.save(self.step, engine=self.checkpoint_engine(), save_model=self.save_model,
                               state={"step": self.step, **self.trainer_state(), "stage": self.stage,
                                      "config": config_mod.to_dict(self.cfg)})

    def _begin(self) -> dict:
        # Forked RNG: work before training leaves the training RNG stream as it was.
        with torch.random.fork_rng(devices=[self.dist.device] if self.dist.device.type == "cuda" else []):
            row = self.begin()
        if row:
            self.logger.log(0, row)
        return row

    def _after_step(self, row: dict, stop_at: int, bar, save_every: int) -> tuple[bool, bool]:
        """Evaluation, final metrics, progress, logging and checkpoint after step ``self.step``;
        returns (whether the row was logged, whether Ctrl-C asks the run to stop here)."""
        log, final = self.cfg.logging, self.step == self.loop_length()
        if (log.eval_every and self.step % log.eval_every == 0) or final:
            row.update(self.evaluate())
        if final:
            row.update(self.finish())
        bar.update(1)
        bar.set_postfix(**self.progress_postfix(row))
        logged = self.log_every_step or self.step % log.log_every == 0 or final or self.step == stop_at \
            or "eval/loss" in row
        if logged:
            self.logger.log(self.step, row)
        stopping = not final and stop_requested(self.dist)  # Ctrl-C (rlhf_fast/trainers/runs.py)
        if (save_every and self.step % save_every == 0) or final or self.step == stop_at or stopping:
            self._checkpoint()
        return logged, stopping

    @guarded_fit
    def fit(self) -> dict:
        """Trains (or resumes), evaluates, checkpoints, runs ``finish`` and writes ``DIR/model``;
        returns the last logged metrics. The output directory is locked for the run; a directory
        holding another run needs ``resume`` or ``overwrite``; Ctrl-C stops after the step with a
        checkpoint (``rlhf_fast/trainers/runs.py``)."""
        self._setup()
        total = self.loop_length()
        stop_at = min(total, self.stop_after() or total)
        save_every = resolve_save_every(self.cfg.logging.save_every, total)
        bar = make_progress(total, self.step, enabled=self.is_main and self.cfg.logging.progress_bar
                            and not os.environ.get("RLHF_FAST_NO_TQDM"), desc=self.stage)
        last: dict = self._begin() if self.step == 0 else {}
        while self.step < stop_at:
            row = self.run_step()
            self.step += 1
            logged, stopping = self._after_step(row, stop_at, bar, save_every)
            if logged:
                last = row
            if stopping:
                break
        bar.close()
        if self.step == total:
            self._write_final_model()
            self.on_complete()
        self.logger.close()
        dss.barrier()
        return last

    def _write_final_model(self) -> None:
        """``DIR/model`` through a temporary sibling and a rename; under ZeRO-3 every rank gathers."""
        if self.cfg.deepspeed.zero_stage != 3:
            save_model_atomically(self.output_dir / "model", lambda d: self.write_model(self.engine.module, d),
                                  is_main=self.is_main)
            return
        tmp = self.output_dir / ".tmp-model"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self.save_model(tmp)
        if self.is_main:
            _replace_dir(tmp, self.output_dir / "model")


class DatasetStageTrainer(StageTrainer):
    """A stage that trains on a fixed dataset (SFT, the reward model): global batches of items in
    a seeded order per epoch, cut into this rank's micro-batches; the loss of a step is a sum over
    units (tokens or pairs) divided by the global batch's unit count.

    A subclass provides ``build_model``, ``build_datasets`` (``self.train_items`` /
    ``self.eval_items``: lists of dataset items), ``collate``, ``units`` (how many loss units a
    list of items holds), ``micro_step`` (summed loss and summed statistics of one micro-batch),
    ``metrics`` (from summed statistics) and ``write_model``.
    """

    def __init__(self, cfg, output_dir, *, resume: bool = False, overwrite: bool = False,
                 dist_info: Optional[dss.DistInfo] = None):
        _build.check_data_files(cfg.data, self.stage)  # bad records fail before distributed set-up and models
        super().__init__(cfg, output_dir, resume=resume, overwrite=overwrite, dist_info=dist_info)
        self.plan = BatchPlan.resolve(cfg, self.dist.world_size, path=f"{self.stage}.")
        dss.seed_everything(cfg.seed, self.dist.rank)
        self._t0, self._units = None, 0.0

    # -- hooks ---------------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def build_datasets(self) -> None:
        raise NotImplementedError

    def collate(self, items: list) -> dict:
        raise NotImplementedError

    def units(self, items: list) -> int:
        raise NotImplementedError

    def micro_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def metrics(self, sums: dict, prefix: str) -> dict:
        raise NotImplementedError

    def stat_keys(self) -> Sequence[str]:
        return ()

    # -- the StageTrainer hooks ------------------------------------------------------------------------
    def setup_stage(self) -> None:
        self.build_datasets()
        self.total_steps = total_steps_of(len(self.train_items), self.plan.batch_size, self.cfg.epochs, self.cfg.max_steps)
        self.steps_per_epoch = steps_per_epoch(len(self.train_items), self.plan.batch_size)
        model = self.build_model()
        self.engine = dss.build_engine(model, optim=self.cfg.optim, sched=self.cfg.scheduler, ds=self.cfg.deepspeed,
                                       plan=self.plan, total_steps=self.total_steps)

    def loop_length(self) -> int:
        return self.total_steps

    def stop_after(self) -> Optional[int]:
        return self.cfg.stop_after_steps

    def trainer_state(self) -> dict:
        return {"total_steps": self.total_steps}

    def progress_postfix(self, row: dict) -> dict:
        return dict(loss=f"{row['train/loss']:.4f}", tok_s=f"{row['perf/tokens_per_s']:.0f}")

    def global_batch(self, step: int) -> list[int]:
        """The item indices of global batch ``step``: the order depends on (seed, epoch) only."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_items), self.cfg.seed, epoch)
        bs = self.plan.batch_size
        return order[k * bs : (k + 1) * bs].tolist()

    def run_step(self) -> dict:
        """One optimizer step on global batch ``self.step``; its row: the stage's metrics of the
        whole global batch (all ranks), the lr it used, throughput."""
        if self._t0 is None:
            self._t0 = time.perf_counter()
        sums = self.train_step(self.global_batch(self.step))
        self._units += sums.get("tokens", 0.0)
        row = self.metrics(sums, "train")
        row["train/lr"] = sums["lr"]
        row["perf/tokens_per_s"] = self._units / max(time.perf_counter() - self._t0, 1e-9)
        return row

    def train_step(self, global_batch: list[int]) -> dict:
        """Forward / backward of this rank's micro-batches (the optimizer steps after the last);
        returns the summed statistics of the whole global batch (all ranks)."""
        denom = self.units([self.train_items[i] for i in global_batch])
        scale = self.plan.grad_accum * self.plan.world_size / max(denom, 1)  # undo DeepSpeed's averaging
        sums: dict[str, float] = {"lr": self.engine.get_lr()[0] / self.dist.world_size}  # the lr this step uses
        self.engine.train()
        micros = self.micro_batches(global_batch)
        for j, micro in enumerate(micros):
            if self.cfg.max_tokens_per_micro_batch:  # a varying count: the optimizer steps after the last
                self.engine.set_gradient_accumulation_boundary(j + 1 == len(micros))
            batch = self.to_device(self.collate([self.train_items[i] for i in micro]))
            loss_sum, stats = self.micro_step(batch)
            self.engine.backward(loss_sum * scale)
            self.engine.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(sums)
        return dict(zip(keys, dss.all_reduce_sum([sums[k] for k in keys], self.dist.device)))

    def micro_batches(self, global_batch: list[int]) -> list[list[int]]:
        """This rank's micro-batches: ``micro_batch_size`` items, or with
        ``max_tokens_per_micro_batch`` cut by tokens (trainers/packing.py, the same count on every
        rank; DeepSpeed still divides by its accumulation steps, which ``scale`` undoes)."""
        budget = self.cfg.max_tokens_per_micro_batch
        if not budget:
            return rank_micro_batches(global_batch, self.plan, self.dist.rank)
        tokens = [self.item_tokens(self.train_items[i]) for i in global_batch]
        return contiguous_token_micro(global_batch, tokens, budget, self.dist.rank, self.dist.world_size)

    def item_tokens(self, item: dict) -> int:
        """Tokens of one dataset item: its ``*input_ids`` tensors (a pair: chosen + rejected)."""
        return sum(int(v.numel()) for k, v in item.items() if k.endswith("input_ids"))

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Metrics on the held-out items (each rank a strided shard; sums all-reduced)."""
        self.engine.eval()
        idx = list(range(self.dist.rank, len(self.eval_items), self.dist.world_size))
        sums: dict[str, float] = {}
        bs = self.cfg.eval_batch_size
        n_batches = math.ceil(len(self.eval_items) / (bs * self.dist.world_size))  # same count on every rank (ZeRO-3)
        for b in range(n_batches):
            chunk = idx[b * bs : (b + 1) * bs]
            if not chunk:  # keep collective forwards in step: score a dummy item, count nothing
                batch = self.to_device(self.collate([self.eval_items[0]]))
                self.micro_step(batch)
                continue
            _, stats = self.micro_step(self.to_device(self.collate([self.eval_items[i] for i in chunk])))
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(set(sums) | set(self.stat_keys()))
        reduced = dict(zip(keys, dss.all_reduce_sum([sums.get(k, 0.0) for k in keys], self.dist.device)))
        return self.metrics(reduced, "eval")
