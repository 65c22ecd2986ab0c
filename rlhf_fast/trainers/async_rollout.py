"""Asynchronous rollouts with bounded staleness (``ppo.rollout``; docs/architecture.md,
"Asynchronous rollouts"): rollout worker processes generate and score the next batches on a
snapshot of the policy while the trainer updates.

Who does what:

    worker w (a forked process: the policy, the scorer and the hybrid engine, copied)
        for iteration i in start + w, start + w + N, ...  (N workers)
            receive weight versions until it holds version  v(i) = max(start, i - K)
            RolloutStage.collect(i, seed(i))  -> (Rollout, RolloutExtras) into the queue, with v(i)
    trainer
        collect(i): take iteration i's batch from the queue (the others wait in a dict); staleness i - v(i)
        ... experience, update (the decoupled objective when K >= 1) ...
        after_update(i): send version i + 1 if a worker will need it (``WeightSync``: bucketed,
                         asynchronous gloo broadcasts; the trainer goes on while they travel)

A worker takes exactly the version ``v(i)`` (it receives no newer one before sampling), so which
weights sampled which batch is a function of (start, K, N): a run repeats itself for the same seed,
and K = 0 samples iteration i from the weights after i updates, as the synchronous loop does, bit
for bit. With K >= 1 generation of batch i overlaps the update on batch i - 1 (K = 1) and the trainer
never waits for a batch while a worker is ahead.

Resume: batches in flight are discarded (not checkpointed): a resumed run starts its workers from the
checkpoint's weights as version ``start``, so its first K batches are fresher than the uninterrupted
run's (staleness 0, 1, ..., K - 1), deterministically.

Failure: a worker that raises sends its traceback (the trainer raises it, naming the worker); a worker
that dies without one (killed, out of memory) is found by the trainer while it waits for a batch or a
broadcast (``check_workers``): a ``RuntimeError`` naming it, never a hang. Workers ignore SIGINT (the
trainer's Ctrl-C handling decides when to stop), get SIGKILL when the trainer process dies
(``PR_SET_PDEATHSIG``), and are terminated by ``close`` when the trainer's ``fit`` returns or raises.
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing
import os
import queue as queue_mod
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

from rlhf_fast.config import AsyncRolloutConfig
from rlhf_fast.trainers.rollout import PhaseTimer, RolloutStage
from rlhf_fast.trainers.weight_sync import WeightSync, join_group, make_store, trainable_parameters

HOST = "127.0.0.1"
JOIN_TIMEOUT_S = 300.0  # the group's set-up and any single broadcast (a dead peer is found sooner: check_workers)


@dataclass(frozen=True)
class StalenessSchedule:
    """Which weights sample which iteration: iterations ``start`` .. ``end - 1``, staleness bound K,
    N workers."""

    start: int
    end: int
    max_staleness: int
    workers: int

    def version_for(self, iteration: int) -> int:
        """The weight version (updates done) that samples ``iteration``."""
        return max(self.start, iteration - self.max_staleness)

    def last_version(self) -> int:
        """The newest version any worker needs."""
        return max(self.start, self.end - 1 - self.max_staleness)

    def iterations_of(self, worker: int) -> range:
        return range(self.start + worker, self.end, self.workers)

    def sends_after(self, iteration: int) -> bool:
        """Whether the trainer sends version ``iteration + 1`` after updating on ``iteration``."""
        return self.start < iteration + 1 <= self.last_version()


@dataclass
class Delivered:
    """One batch from a worker: this rank's rollout and extras of ``iteration``, sampled by weight
    ``version`` (staleness = iteration - version) in ``seconds`` (generate / score)."""

    worker: int
    iteration: int
    version: int
    rollout: object
    extras: object
    seconds: dict


@dataclass(frozen=True)
class _Done:
    """A worker has delivered all its batches and joined every broadcast."""

    worker: int


@dataclass(frozen=True)
class _Failed:
    """A worker raised: its traceback."""

    worker: int
    traceback: str


def _pack(batch: Delivered) -> bytes:
    """The batch as bytes: the queue's default tensor pickling shares memory through the sender's
    file descriptors, which vanish when a worker exits before the trainer reads its last batch."""
    buf = io.BytesIO()
    torch.save(batch, buf)
    return buf.getvalue()


def _unpack(data: bytes) -> Delivered:
    return torch.load(io.BytesIO(data), weights_only=False)  # our own worker's bytes


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the trainer process dies (Linux ``prctl(PR_SET_PDEATHSIG)``)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except OSError:  # not glibc: close() and the daemon flag still stop the workers
        pass
    if os.getppid() != parent_pid:  # the trainer died before prctl took effect
        os._exit(1)


def _worker_main(worker: int, port: int, stage: RolloutStage, module: torch.nn.Module, schedule: StalenessSchedule,
                 seed_of: Callable[[int], int], bucket_bytes: int, out: multiprocessing.Queue, parent_pid: int) -> None:
    """A rollout worker (forked: ``stage`` and ``module`` are its own copies). Never returns."""
    code = 0
    try:
        # libgomp's thread pool does not survive fork: a child whose parent already ran an OpenMP
        # region with several threads hangs in its first one. One thread per worker (rollouts run
        # beside the trainer's threads anyway).
        torch.set_num_threads(1)
        _die_with_parent(parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
        size = schedule.workers + 1
        store = make_store(HOST, port, size, timeout_s=JOIN_TIMEOUT_S, is_master=False)
        sync = WeightSync(trainable_parameters(module), join_group(store, worker + 1, size, timeout_s=JOIN_TIMEOUT_S),
                          bucket_bytes)
        sync.recv()  # version `start`: the trainer's weights when the workers started
        version = schedule.start
        stage.gen.on_weights_updated()
        for it in schedule.iterations_of(worker):
            while version < schedule.version_for(it):
                sync.recv()
                version += 1
                stage.gen.on_weights_updated()  # the Generator contract (a no-op for the hybrid engine)
            timer = PhaseTimer({})
            rollout, extras = stage.collect(it, seed_of(it), timer)
            out.put(_pack(Delivered(worker, it, version, rollout, extras, dict(timer.seconds))))
        while version < schedule.last_version():  # every worker joins every broadcast
            sync.recv()
            version += 1
        out.put(_Done(worker))
    except BaseException:  # noqa: BLE001 - everything goes to the trainer, which raises it
        code = 1
        out.put(_Failed(worker, traceback.format_exc()))
    finally:
        out.close()
        out.join_thread()  # the queue's feeder thread has written everything
        os._exit(code)  # no interpreter teardown: the forked copy of the trainer's state is not ours to close


class AsyncRollouts:
    """The trainer's side: starts the workers (``start``), hands out each iteration's batch
    (``collect``), sends the weights after each update (``after_update``), stops them (``close``)."""

    def __init__(self, stage: RolloutStage, module: torch.nn.Module, cfg: AsyncRolloutConfig,
                 schedule: StalenessSchedule, seed_of: Callable[[int], int]):
        self.stage, self.module, self.cfg, self.schedule, self.seed_of = stage, module, cfg, schedule, seed_of
        self.procs: list = []
        self.sync = None
        self._ready: dict[int, Delivered] = {}
        self._done: set[int] = set()

    def start(self) -> None:
        ctx = multiprocessing.get_context("fork")  # the workers are copies of the built parts
        self.queue = ctx.Queue()
        n = self.schedule.workers
        store = make_store(HOST, 0, n + 1, timeout_s=JOIN_TIMEOUT_S, is_master=True)
        bucket_bytes = int(self.cfg.bucket_mb * 2**20)
        for w in range(n):
            p = ctx.Process(target=_worker_main, name=f"rlhf-fast rollout worker {w}", daemon=True,
                            args=(w, store.port, self.stage, self.module, self.schedule, self.seed_of, bucket_bytes,
                                  self.queue, os.getpid()))
            p.start()
            self.procs.append(p)
        group = self._join(store, n + 1)
        self.store = store
        self.sync = WeightSync(trainable_parameters(self.module), group, bucket_bytes, check=self.check_workers)
        self.sync.send()  # version `start`

    def _join(self, store, size: int):
        """The group, built in a thread while the workers are watched (one that dies first is an error)."""
        box: dict = {}

        def build():
            try:
                box["group"] = join_group(store, 0, size, timeout_s=JOIN_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - re-raised below
                box["error"] = e

        t = threading.Thread(target=build, daemon=True)
        t.start()
        while t.is_alive():
            self.check_workers()
            t.join(0.01)
        if "error" in box:
            raise RuntimeError(f"rollout workers: the weight-sync process group failed: {box['error']}")
        return box["group"]

    # -- the iteration ---------------------------------------------------------------------------

    def collect(self, iteration: int) -> tuple[Delivered, float]:
        """Iteration ``iteration``'s batch and the seconds the trainer waited for it."""
        t0 = time.perf_counter()
        while iteration not in self._ready:
            try:
                self._take(self.queue.get(timeout=0.05))
            except queue_mod.Empty:
                self.check_workers()
        got = self._ready.pop(iteration)
        if iteration - got.version > self.schedule.max_staleness:  # the schedule forbids it: a bug, not a setting
            raise RuntimeError(f"rollout worker {got.worker} sampled iteration {iteration} with weight version "
                               f"{got.version}: staleness above ppo.rollout.max_staleness {self.schedule.max_staleness}")
        return got, time.perf_counter() - t0

    def after_update(self, iteration: int) -> None:
        if self.schedule.sends_after(iteration):
            self.sync.send()

    def _take(self, msg) -> None:
        """One message of a worker: a batch (bytes), ``_Done`` or ``_Failed`` (raised, naming it)."""
        if isinstance(msg, _Done):
            self._done.add(msg.worker)
        elif isinstance(msg, _Failed):
            raise RuntimeError(f"rollout worker {msg.worker} (pid {self.procs[msg.worker].pid}) failed:\n{msg.traceback}")
        else:
            got = _unpack(msg)
            self._ready[got.iteration] = got

    def check_workers(self) -> None:
        """Raises when a worker has exited before finishing (its error message first, if it sent one)."""
        for w, p in enumerate(self.procs):
            if p.exitcode is None or w in self._done:
                continue
            while True:  # an error it sent before exiting names the cause
                try:
                    self._take(self.queue.get(timeout=0.2))
                except queue_mod.Empty:
                    break
            if w in self._done:
                continue
            how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
            raise RuntimeError(f"rollout worker {w} (pid {p.pid}) died ({how}) before delivering its batches "
                               f"(iterations {list(self.schedule.iterations_of(w))[:4]}...)")

    def close(self) -> None:
        """Stops the workers (any batches in flight are discarded)."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []
