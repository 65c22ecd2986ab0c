"""A rank that died: the live ranks stop within a bounded time with an error naming it.

When a rank dies (SIGKILL, a node lost, an OOM kill), the others' next collective fails: at once
when the peer's connection closes (a killed process), or after ``deepspeed.timeout_s`` when it
just stops answering (a lost node). A collective error alone does not say which rank is gone, so
the stage loop (``trainers/stage_loop.py``) asks ``lost_rank_error`` after a step failed in a
collective (``is_collective_failure``; this rank's own errors pass through unchanged): every
live rank writes its name into the rendezvous store (``MASTER_ADDR:MASTER_PORT``; under
``torchrun`` the launcher's store, which outlives the ranks) and waits up to ``ROLL_CALL_S`` for
the others; a rank that does not answer is named in ``RankLost`` with the last completed step
and the newest checkpoint. The command prints that line and exits with ``EXIT_RANK_LOST`` (76)
(docs/architecture.md, "Faults").
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Optional

from rlhf_fast.trainers.run.stopping import RankLost

#: seconds the live ranks wait for each other's answer (well inside the 30 s torchrun gives its
#: workers between SIGTERM and SIGKILL once it has seen one die)
ROLL_CALL_S = 5.0


def is_collective_failure(e: BaseException) -> bool:
    """Whether ``e`` came out of a ``torch.distributed`` call (a peer gone, a timeout): a
    ``DistError``, or an error raised in a ``torch/distributed`` frame (gloo's "Connection reset by
    peer" is a plain RuntimeError from ``work.wait()``). This rank's own failure (an OOM, a bug) is
    not one: the other ranks, stuck in their next collective, would not answer a roll call."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "torch/distributed/" in tb.tb_frame.f_code.co_filename.replace(os.sep, "/")


def _store(timeout_s: float):
    from torch.distributed import TCPStore

    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def roll_call(rank: int, world_size: int, tag: str, *, wait_s: float = ROLL_CALL_S) -> Optional[list[int]]:
    """The ranks that did not answer within ``wait_s`` (this one answers); None when the store
    itself cannot be reached (its host is gone: rank 0 without ``torchrun``)."""
    try:
        store = _store(wait_s)
        prefix = f"rlhf_fast/roll_call/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{tag}"
        store.set(f"{prefix}/{rank}", "alive")
        others = [r for r in range(world_size) if r != rank]
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in others if not store.check([f"{prefix}/{r}"])]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.1)
    except (RuntimeError, OSError, KeyError, ValueError):  # connection refused / reset, no MASTER_*
        return None


def lost_rank_error(*, rank: int, world_size: int, stage: str, step: int, where: str,
                    wait_s: float = ROLL_CALL_S) -> Optional[RankLost]:
    """After a step failed on this rank of a multi-rank run: ``RankLost`` naming the ranks that no
    longer answer, or None when all answer (the failure was something else: re-raise it).
    ``step``: the steps completed; ``where``: the newest checkpoint, as the guard says it."""
    missing = roll_call(rank, world_size, f"{stage}/{step}", wait_s=wait_s)
    if missing == []:
        return None
    who = ("rank 0 (it hosts the rendezvous store, which no longer answers)" if missing is None else
           ", ".join(f"rank {r}" for r in missing))
    return RankLost(f"{stage}: {who} of {world_size} died or stopped answering during step {step + 1} (the last "
                    f"completed step is {step}); rank {rank} stops too. {where}")
