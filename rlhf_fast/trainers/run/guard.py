"""Runs that are never silently lost: the output-directory lock, the fresh / ``--resume`` /
``--overwrite`` decision, and Ctrl-C.

A trainer's ``fit`` is wrapped by ``guarded_fit`` (``StageTrainer.fit``, ``PPOTrainer.fit``), which
before anything is built

1. locks the output directory (rank 0 only: one lock per run, however many ranks): a second run on
   the same directory is refused with the holder's pid; a lock left by a dead process is taken over
   (``OutputDirLock``);
2. decides what the run does with the directory (``decide_start``): a fresh run refuses a directory
   that holds a previous run (its checkpoints, metrics, TensorBoard events, samples, model) unless
   ``overwrite`` is given, and only then deletes them; ``--resume`` continues from the newest
   complete checkpoint, starts a new run with an explicit warning when the directory holds no run at
   all (so a job script can always pass ``--resume``, and ``pipeline --resume`` can resume stages
   that never started), and refuses a directory whose run left no complete checkpoint (starting
   over would replace that run's record: ``--overwrite`` says so explicitly). Every rank takes the
   same decision (the reasons are all-reduced), so no rank is left waiting in a collective;
3. turns Ctrl-C, SIGTERM and SIGUSR1 into a clean stop (``stopping.py``): the current step (PPO:
   iteration) finishes, a checkpoint is written and the run stops (``stop_requested``, polled by
   the training loops once per step); a second Ctrl-C, or a step running past
   ``logging.preempt_grace_s`` after a scheduler's signal, stops at once. ``fit`` then raises
   ``Interrupted`` (Ctrl-C; a ``KeyboardInterrupt``) or ``Preempted`` (a scheduler's signal; the
   command exits with 75) whose message is the one line the command prints: where the run stands
   and how to continue.
"""

from __future__ import annotations

import datetime
import errno
import functools
import json
import logging
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rlhf_fast.trainers.run.checkpoints import check_checkpoint_settings, latest_checkpoint
from rlhf_fast.trainers.run.stopping import (  # noqa: F401  (Interrupted, Preempted, stop_requested: re-exported)
    Interrupted,
    Preempted,
    StopScope,
    agree_preempted,
    stop_requested,
)

log = logging.getLogger(__name__)

LOCK_FILE = ".rlhf_fast.lock"

# What a run leaves in its output directory (config.yaml alone is not a run: every start rewrites it,
# and a run that failed during set-up leaves only it). The pipeline's own summary is listed too.
RUN_RECORD = ("checkpoints", "metrics.jsonl", "tensorboard", "samples.jsonl", "model", "plots", "summary.json")


class OutputDirBusy(ValueError):
    """Another live process holds the output directory's lock."""


# ---- the lock -----------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class OutputDirLock:
    """An exclusive lock on a run directory: ``DIR/.rlhf_fast.lock`` holding the holder's pid, host,
    start time and command line.

    The lock itself is ``fcntl.flock`` on that file, which the kernel drops when the holder dies (a
    ``kill -9`` or a crash leaves a file naming a dead pid, and the next run takes it over with a
    warning); the file is never deleted, so two runs never lock two different inodes of one path.
    File systems without ``flock`` (some network mounts) fall back to the pid in the file: held
    while that pid is alive on this host.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict:
        """The holder's record ({} when the file is missing, empty or unreadable)."""
        try:
            text = self.path.read_text().strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}

    def _busy(self, holder: dict) -> OutputDirBusy:
        who = f"pid {holder.get('pid', '?')}"
        if holder.get("host"):
            who += f" on {holder['host']}"
        since = f", started {holder['started']}" if holder.get("started") else ""
        cmd = f": {holder['command']}" if holder.get("command") else ""
        return OutputDirBusy(f"{self.directory} is in use by another run ({who}{since}{cmd}); wait for it to "
                             f"finish or stop it, or choose another --output-dir (lock file {self.path})")

    def acquire(self) -> "OutputDirLock":
        if self.held:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            previous = self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        if previous.get("pid") not in (None, os.getpid()):
            log.warning("%s: taking over the lock of pid %s (started %s), which no longer runs", self.directory,
                        previous.get("pid"), previous.get("started", "?"))
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else ""}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def _lock(self, fd: int) -> dict:
        """Locks ``fd``; returns the previous holder's record (a stale one, or {}); raises
        ``OutputDirBusy`` while a live process holds it."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy(self.holder()) from None
        except OSError as e:  # no flock on this file system: the pid in the file decides
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            holder = self.holder()
            pid = holder.get("pid")
            if (isinstance(pid, int) and pid != os.getpid() and holder.get("host") == socket.gethostname()
                    and _pid_alive(pid)):
                raise self._busy(holder) from None
            return holder
        return self.holder()

    def release(self) -> None:
        """Empties the file (the record names no holder) and drops the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---- fresh, resume or overwrite ---------------------------------------------------------------------------


def previous_run(directory) -> list[str]:
    """What an earlier run left in ``directory`` (empty: nothing), as short descriptions."""
    d = Path(directory)
    found = []
    ckpt = d / "checkpoints"
    if ckpt.is_dir():
        steps = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-"))
        if steps:
            found.append(f"checkpoints/{steps[-1]}" + (f" (+{len(steps) - 1} older)" if len(steps) > 1 else ""))
        elif any(ckpt.iterdir()):
            found.append("checkpoints/")
    metrics = d / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        last = metrics.read_text().strip().splitlines()[-1:] or [""]
        try:
            found.append(f"metrics.jsonl up to step {json.loads(last[0])['step']}")
        except (ValueError, KeyError, TypeError):
            found.append("metrics.jsonl")
    for name in ("tensorboard", "plots"):
        if (d / name).is_dir() and any((d / name).iterdir()):
            found.append(f"{name}/")
    for name in ("samples.jsonl", "summary.json"):
        if (d / name).is_file():
            found.append(name)
    if (d / "model").exists():
        found.append("model/")
    return found


@dataclass(frozen=True)
class StartDecision:
    """What a run does with its directory: "resume" (from ``checkpoint``), "fresh" (nothing there),
    "overwrite" (delete ``found`` first); ``error``: why it must not start (then nothing happens)."""

    action: str
    found: tuple = ()
    checkpoint: Optional[Path] = None
    error: Optional[str] = None


def decide_start(directory, *, stage: str, resume: bool, overwrite: bool) -> StartDecision:
    """Reads the directory (nothing is changed) and decides; see the module docstring."""
    d = Path(directory)
    if resume and overwrite:
        return StartDecision("error", error="--resume and --overwrite exclude each other: --resume continues the "
                                            f"run in {d}, --overwrite deletes it and starts a new one")
    found = tuple(previous_run(d))
    if resume:
        ckpt = latest_checkpoint(d)
        if ckpt is not None:
            return StartDecision("resume", found, ckpt)
        if not found:
            return StartDecision("fresh")
        pointer = d / "checkpoints" / "latest"
        why = (f"{pointer} names {pointer.read_text().strip()!r}, and neither it nor an older checkpoint is complete "
               "and matches its manifest" if pointer.is_file() else "no checkpoint was completed")
        return StartDecision("error", found, error=(
            f"--resume: {d} holds a previous {stage} run ({', '.join(found)}) but nothing to resume from ({why}). "
            "Pass --overwrite (instead of --resume) to delete it and start over, or choose another --output-dir"))
    if found and not overwrite:
        return StartDecision("error", found, error=(
            f"{d} holds a previous {stage} run ({', '.join(found)}): pass --resume to continue it, --overwrite to "
            "delete it and start over, or choose another --output-dir"))
    return StartDecision("overwrite" if found else "fresh", found)


def clear_run(directory) -> list[str]:
    """Deletes what ``previous_run`` reports (``RUN_RECORD``); returns the removed names."""
    d = Path(directory)
    removed = []
    for name in RUN_RECORD:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def start_together(decide, *, dist=None, lock: Optional[OutputDirLock] = None, what: str = "the run") -> None:
    """Takes ``lock`` (rank 0), runs ``decide()`` (returns an error message or None; may raise
    ValueError) on every rank, and raises on every rank when any rank refused, so that no rank goes
    on into a collective the others never reach. The lock is released again on refusal."""
    from rlhf_fast.trainers import deepspeed_setup as dss

    error = None
    try:
        if lock is not None and (dist is None or dist.is_main):
            lock.acquire()
        msg = decide()
        if msg:
            error = ValueError(msg)
    except ValueError as e:  # OutputDirBusy included
        error = e
    refused = error is not None
    if dist is not None and dist.world_size > 1:  # every rank takes the same decision
        refused = dss.all_reduce_sum([float(error is not None)], dist.device)[0] > 0
    if refused:
        if lock is not None:
            lock.release()
        raise error if error is not None else ValueError(f"another rank refused to start {what} (rank 0 names the reason)")


def ensure_fresh_or_overwrite(directory, *, stage: str, resume: bool, overwrite: bool, dist=None,
                              lock: Optional[OutputDirLock] = None, config: Optional[dict] = None) -> StartDecision:
    """Locks (rank 0, when ``lock`` is given), decides, agrees over the ranks, and on "overwrite"
    deletes the earlier run (rank 0). With ``config`` (``to_dict`` of the stage's config), a resume
    from a checkpoint of another stage or with other settings is refused here, before any model is
    built. Raises ``ValueError`` (``OutputDirBusy`` for the lock) on every rank when any rank
    refuses; the lock is then released again."""
    from rlhf_fast.trainers import deepspeed_setup as dss

    is_main = dist is None or dist.is_main
    decision = None

    def decide():
        nonlocal decision
        decision = decide_start(directory, stage=stage, resume=resume, overwrite=overwrite)
        if decision.action == "resume" and config is not None:
            check_checkpoint_settings(decision.checkpoint, stage=stage, config=config)
        return decision.error

    start_together(decide, dist=dist, lock=lock, what=f"{stage} in {directory}")
    if decision.action == "overwrite" and is_main:
        removed = clear_run(directory)
        log.warning("--overwrite: deleted the previous %s run in %s (%s)", stage, directory, ", ".join(removed))
    elif decision.action == "fresh" and resume and is_main:
        log.warning("--resume: nothing to resume in %s (no previous %s run): starting a new run", directory, stage)
    elif decision.action == "resume" and is_main:
        log.info("--resume: continuing from %s", decision.checkpoint)
    dss.barrier()
    return decision


# ---- Ctrl-C, SIGTERM, SIGUSR1 (``stopping.py``) ------------------------------------------------------


def where_it_stands(directory, stage: str) -> str:
    """The newest checkpoint and how to continue, as the stop messages say it."""
    ckpt = latest_checkpoint(directory)
    if ckpt is not None:
        return f"the newest checkpoint is {ckpt}: continue with --resume"
    if previous_run(directory):
        return "no checkpoint was written yet: start again with --overwrite"
    return "nothing was written"


def guarded_fit(fit):
    """Decorator for a trainer's ``fit``: the lock, the start decision and clean stops (module
    docstring). Reads ``self.output_dir``, ``self.stage``, ``self.resume``, ``self.overwrite``,
    ``self.dist`` and ``self.cfg.logging.preempt_grace_s``."""

    @functools.wraps(fit)
    def wrapper(self, *args, **kwargs):
        dist = self.dist
        lock = OutputDirLock(self.output_dir) if dist.is_main else None
        from rlhf_fast.config import to_dict

        ensure_fresh_or_overwrite(self.output_dir, stage=self.stage, resume=self.resume,
                                  overwrite=getattr(self, "overwrite", False), dist=dist, lock=lock,
                                  config=to_dict(self.cfg))
        scope = StopScope(getattr(self.cfg.logging, "preempt_grace_s", None))
        try:
            with scope:
                out = fit(self, *args, **kwargs)
        except Interrupted:
            raise
        except KeyboardInterrupt:
            raise _stop_error(self, scope, at_once=True) from None
        finally:
            if lock is not None:
                lock.release()
        if scope.stopped:
            raise _stop_error(self, scope, at_once=False)
        if agree_preempted(scope.preempt, dist):  # the stage finished as the signal came: go no further
            raise Preempted(f"{self.stage} finished; stopping for {scope.preempt or 'a signal on another rank'}: "
                            "continue with --resume")
        return out

    return wrapper


def _stop_error(trainer, scope: StopScope, *, at_once: bool) -> Interrupted:
    """The one line a stopped stage shows: why it stopped, where it stands, how to go on."""
    where = where_it_stands(trainer.output_dir, trainer.stage)
    if scope.preempt is None:
        verb = "interrupted" if at_once else "stopped by"
        return Interrupted(f"{trainer.stage} {verb} (Ctrl-C); {where}" if at_once else
                           f"{trainer.stage} {verb} Ctrl-C; {where}")
    if at_once:
        grace = getattr(trainer.cfg.logging, "preempt_grace_s", None)
        why = "a Ctrl-C" if grace is None else f"the step ran past logging.preempt_grace_s = {grace:g} s, or a Ctrl-C"
        return Preempted(f"{trainer.stage} stopped at once by {scope.preempt} ({why}); {where}")
    return Preempted(f"{trainer.stage} stopped by {scope.preempt} after its step; {where}")


def resolve_save_every(save_every: Optional[int], total: int) -> int:
    """``logging.save_every`` in steps (PPO: iterations): None is a tenth of the run, rounded up."""
    if save_every is None:
        return max(1, -(-total // 10))
    return save_every
