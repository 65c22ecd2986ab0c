"""Clean stops: Ctrl-C, and the signals a cluster scheduler sends before it kills a job.

- **Ctrl-C** (SIGINT): the first lets the current step (PPO: iteration) finish, writes a checkpoint
  and stops; a second one stops at once. Before the loop's first step has finished there is
  nothing to save, and Ctrl-C stops at once.
- **SIGTERM** (what SLURM and Kubernetes send before SIGKILL) and **SIGUSR1** (SLURM's
  ``--signal=USR1@N`` warning before the time limit): the same clean stop, from any point of the
  stage (set-up included: the run stops after its next step), bounded by ``logging.preempt_grace_s``:
  a step still running that long after the signal is abandoned and the run stops at once (the
  previous checkpoint stands). Further preemption signals are ignored (the grace period decides).
  The command then exits with ``EXIT_PREEMPTED`` (75), which a job script tests to requeue itself
  with ``--resume``.
- **Failures** that stop a run with one line and their own exit status: a checkpoint that cannot
  be written (``CheckpointWriteError``, 74) and a lost rank (``RankLost``, 76).

The handlers only set flags (and arm the grace timer, ``SIGALRM``); the training loop polls
``stop_requested`` once per step on every rank (one all-reduce), so all ranks stop at the same step
and write the same checkpoint. ``StopScope`` installs the handlers for one ``fit`` and restores the
previous ones. docs/architecture.md, "Faults" lists the exit statuses.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

#: exit status of a run stopped by SIGTERM / SIGUSR1 (sysexits.h EX_TEMPFAIL: "try again later"):
#: its checkpoint is written, ``--resume`` continues it
EXIT_PREEMPTED = 75
#: exit status of a Ctrl-C stop (128 + SIGINT, as a shell reports one)
EXIT_INTERRUPTED = 130
#: exit status of a run stopped because its checkpoint could not be written (sysexits.h EX_IOERR)
EXIT_CHECKPOINT_FAILED = 74
#: exit status of a rank that stopped because another rank died or stopped answering
EXIT_RANK_LOST = 76

PREEMPT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; ``str()`` is the line to show (where the run stands, how to go on)."""


class Preempted(Interrupted):
    """SIGTERM or SIGUSR1 stopped a run (the command exits with ``EXIT_PREEMPTED``); ``str()`` is
    the line to show."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount); ``str()`` says which, why, and
    which checkpoint stands (``trainers/run/checkpoints.py``). Exit status ``EXIT_CHECKPOINT_FAILED``."""


class RankLost(RuntimeError):
    """Another rank died or stopped answering; ``str()`` names it and the last completed step
    (``trainers/run/rank_watch.py``). Exit status ``EXIT_RANK_LOST``."""


class _StopNow(KeyboardInterrupt):
    """Raised by the grace timer: the step did not finish within ``logging.preempt_grace_s``."""


class _StopState:
    def __init__(self):
        self.reset()

    def reset(self):
        self.installed = False
        self.armed = False  # set by the loop's first stop_requested(): before it, Ctrl-C stops at once
        self.requested = False  # Ctrl-C asked for a clean stop
        self.preempt: Optional[str] = None  # the name of the scheduler's signal, once one arrived
        self.observed = False  # the loop saw a stop request and stopped
        self.grace_s: Optional[float] = None
        self.timer_armed = False
        self.previous: dict = {}


_STOP = _StopState()


def _say(text: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # every rank gets the signal; one says so
        print(f"\nrlhf-fast: {text}", file=sys.stderr, flush=True)


def _on_sigint(signum, frame):
    if not _STOP.armed or _STOP.requested:  # outside the loop, or a second Ctrl-C: stop now
        raise KeyboardInterrupt
    _STOP.requested = True
    _say("Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again stops at once)")


def _on_preempt(signum, frame):
    if _STOP.preempt is not None:  # a repeated signal: the grace period already runs
        return
    _STOP.preempt = signal.Signals(signum).name
    grace = _STOP.grace_s
    if grace is not None and grace <= 0:
        raise _StopNow
    if grace is not None:
        signal.setitimer(signal.ITIMER_REAL, grace)  # -> _on_grace_over, in this (the main) thread
        _STOP.timer_armed = True
    within = f" (at once if the step runs past {grace:g} s)" if grace is not None else ""
    _say(f"{_STOP.preempt}: stopping after this step and writing a checkpoint{within}")


def _on_grace_over(signum, frame):
    _STOP.timer_armed = False
    raise _StopNow


def _cancel_grace_timer() -> None:
    if _STOP.timer_armed:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _STOP.timer_armed = False


def stop_requested(dist=None) -> bool:
    """Polled by a training loop once per step (PPO: iteration), after the step and before its
    checkpoint decision, on every rank (it all-reduces the flags, one tiny collective, so all ranks
    stop at the same step): True when Ctrl-C or a scheduler's signal asked the run to stop; the
    loop then checkpoints and breaks (the grace timer is cancelled: the checkpoint is what it
    waited for). Its first call arms Ctrl-C's graceful mode."""
    _STOP.armed = _STOP.installed
    flags = [float(_STOP.requested), float(_STOP.preempt is not None)]
    if dist is not None and dist.world_size > 1:
        from rlhf_fast.trainers import deepspeed_setup as dss

        flags = dss.all_reduce_sum(flags, dist.device)  # CPU-GPU sync point, once per step
    if flags[1] > 0 and _STOP.preempt is None:
        _STOP.preempt = "a signal on another rank"
    if flags[0] > 0 or flags[1] > 0:
        _STOP.observed = True
        _cancel_grace_timer()
        return True
    return False


class StopScope:
    """Installs the handlers for one ``fit`` (main thread only; nested scopes keep the outer one).
    After it: ``stopped`` (the loop stopped on a request), ``preempt`` (the scheduler signal's name
    or None), ``at_once`` (a stop raised inside a step, by a second Ctrl-C or the grace timer)."""

    def __init__(self, grace_s: Optional[float] = None):
        self.grace_s = grace_s
        self.owner, self.stopped, self.preempt = False, False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and not _STOP.installed:
            _STOP.reset()
            _STOP.previous = {signal.SIGINT: signal.signal(signal.SIGINT, _on_sigint),
                              signal.SIGALRM: signal.signal(signal.SIGALRM, _on_grace_over)}
            for sig in PREEMPT_SIGNALS:
                _STOP.previous[sig] = signal.signal(sig, _on_preempt)
            _STOP.installed, _STOP.grace_s = True, self.grace_s
            self.owner = True
        return self

    def __exit__(self, *exc):
        if not self.owner:
            return
        _cancel_grace_timer()
        for sig, previous in _STOP.previous.items():  # None: a handler set outside Python
            fallback = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, previous if previous is not None else fallback)
        self.stopped, self.preempt = _STOP.observed, _STOP.preempt
        _STOP.reset()


def agree_preempted(preempt: Optional[str], dist=None) -> Optional[str]:
    """After a stage that finished while a scheduler's signal was pending: whether any rank got
    one (all ranks then stop before the next stage; one all-reduce)."""
    if dist is None or dist.world_size <= 1:
        return preempt
    from rlhf_fast.trainers import deepspeed_setup as dss

    anyone = dss.all_reduce_sum([float(preempt is not None)], dist.device)[0] > 0
    return preempt or ("a signal on another rank" if anyone else None)
