"""The loop every stage runs (SFT, reward model, PPO): ``StageTrainer`` (set-up, a fresh start or
a resume, steps with evaluation, metrics and checkpoints, the final model) and the
``DatasetStageTrainer`` that SFT and the reward model fill in with a model, datasets and a loss.
Checkpoints: ``trainers/run/checkpoints.py``; metrics and the progress bar: ``trainers/run/metrics_log.py``;
the data order: ``trainers/data_order.py``; the directory lock, the start decision and Ctrl-C:
``trainers/run/guard.py``.

Output directory layout::

    DIR/config.yaml                       the stage's resolved config
    DIR/metrics.jsonl                     one JSON object per logged step: {"step": ..., "train/loss": ...}
    DIR/tensorboard/                      the same metrics as TensorBoard events
    DIR/checkpoints/step-000120/          model/ (HF format + tokenizer), deepspeed/ (engine state),
                                          trainer_state.json (written last)
    DIR/checkpoints/latest                name of the newest complete checkpoint
    DIR/model/                            the final model (HF format + tokenizer)
    DIR/.rlhf_fast.lock                   the lock of the run using DIR (``rlhf_fast.trainers.run.guard``)

``fit`` refuses a ``DIR`` that holds an earlier run unless it resumes or overwrites it, and locks
``DIR`` while it runs (``rlhf_fast.trainers.run.guard``).

Exactness: a loss is a sum over units (tokens or pairs) divided by the number of units in the
whole global batch, so 1 rank with 2 micro-batches and 2 ranks with 1 each compute the same
gradient up to summation order. Data order depends on the seed and epoch only (never on the rank
or world size); a resumed run skips the batches it has done, so it repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from rlhf_fast import config as config_mod
from rlhf_fast.config import BatchPlan, LoggingConfig
from rlhf_fast.trainers import _build
from rlhf_fast.trainers import deepspeed_setup as dss
from rlhf_fast.trainers.data_order import epoch_order, rank_micro_batches, steps_per_epoch, total_steps_of
from rlhf_fast.trainers.run.atomic_files import atomic_write_text, replace_dir, save_model_atomically
from rlhf_fast.trainers.run.checkpoints import Checkpointer
from rlhf_fast.trainers.run.guard import guarded_fit, previous_run, resolve_save_every, stop_requested, where_it_stands
from rlhf_fast.trainers.run.rank_watch import is_collective_failure, lost_rank_error
from rlhf_fast.trainers.run.metrics_log import MetricsLogger, make_progress
from rlhf_fast.trainers.token_budget import contiguous_token_micro


# ---- starting a stage -----------------------------------------------------------------------------


def start_fresh(output_dir: Path, checkpointer: Checkpointer, *, is_main: bool) -> None:
    """A run that does not resume starts in a directory without an earlier run: ``fit``'s guard
    (``rlhf_fast.trainers.run.guard.guarded_fit``) refused one, or deleted it under ``overwrite``, before
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
    atomic_write_text(output_dir / "config.yaml", config_mod.dump_yaml({stage: config_mod.to_dict(cfg)}))



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
        self.dist = dist_info or dss.init_distributed(cfg.deepspeed.backend, cfg.deepspeed.timeout_s)
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
        stopping = not final and stop_requested(self.dist)  # Ctrl-C, SIGTERM, SIGUSR1 (trainers/run/stopping.py)
        if (save_every and self.step % save_every == 0) or final or self.step == stop_at or stopping:
            self._checkpoint()
        return logged, stopping

    @guarded_fit
    def fit(self) -> dict:
        """Trains (or resumes), evaluates, checkpoints, runs ``finish`` and writes ``DIR/model``;
        returns the last logged metrics. The output directory is locked for the run; a directory
        holding another run needs ``resume`` or ``overwrite``; Ctrl-C stops after the step with a
        checkpoint (``rlhf_fast/trainers/run/guard.py``)."""
        self._setup()
        total = self.loop_length()
        stop_at = min(total, self.stop_after() or total)
        save_every = resolve_save_every(self.cfg.logging.save_every, total)
        bar = make_progress(total, self.step, enabled=self.is_main and self.cfg.logging.progress_bar
                            and not os.environ.get("RLHF_FAST_NO_TQDM"), desc=self.stage)
        last: dict = self._begin() if self.step == 0 else {}
        while self.step < stop_at:
            with self._rank_watch():
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

    @contextlib.contextmanager
    def _rank_watch(self):
        """A step of a multi-rank run that fails in a collective because another rank died or
        stopped answering raises ``RankLost`` naming it and the last completed step instead
        (``trainers/run/rank_watch.py``); any other failure is raised as it is."""
        try:
            yield
        except RuntimeError as e:  # torch.distributed's errors (DistBackendError...) are RuntimeErrors
            if self.dist.world_size <= 1 or not is_collective_failure(e):
                raise
            where = where_it_stands(self.output_dir, self.stage)
            lost = lost_rank_error(rank=self.dist.rank, world_size=self.dist.world_size, stage=self.stage,
                                   step=self.step, where=where[:1].upper() + where[1:])
            if lost is None:
                raise
            raise lost from e

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
            replace_dir(tmp, self.output_dir / "model")


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
        ``max_tokens_per_micro_batch`` cut by tokens (trainers/token_budget.py, the same count on every
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
