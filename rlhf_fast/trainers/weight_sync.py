"""Weight sync of asynchronous rollouts (docs/architecture.md, "Asynchronous rollouts"): the
trainer's trainable parameters (with LoRA: the adapters, and any trained head) broadcast to the
rollout workers over a ``torch.distributed`` process group of their own (gloo on CPU), in flat
buckets.

The group is a standalone ``ProcessGroupGloo`` on a ``TCPStore`` the trainer hosts (rank 0 =
trainer, rank 1 + w = worker w), not the default group: DeepSpeed's default group holds the
trainer's ranks only, and a worker must never join its collectives. The frozen weights (with LoRA:
the whole base model) are the same in every process since the workers are forked copies, so they
never travel.

Cost: one copy of the parameters into the buckets (the trainer's optimizer may change the
parameters while a broadcast is in flight, so it sends a copy), then one broadcast per bucket,
issued asynchronously: the trainer waits for the previous sync's broadcasts only when it starts the
next one. ``SyncStats`` records the bytes and the seconds the trainer spent (copy + issue + wait).
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

GROUP_PREFIX = "rlhf_fast/rollout_weights"


def make_store(host: str, port: int, size: int, *, timeout_s: float, is_master: bool):
    """The rendezvous of the trainer (``is_master``: it hosts the store) and the workers. ``port`` 0
    lets the master pick a free port (read it from ``store.port``)."""
    return dist.TCPStore(host, port, size, is_master, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_group(store, rank: int, size: int, *, timeout_s: float):
    """The gloo group over ``store`` (blocks until every rank has joined)."""
    return dist.ProcessGroupGloo(dist.PrefixStore(GROUP_PREFIX, store), rank, size,
                                 datetime.timedelta(seconds=timeout_s))


def trainable_parameters(module: torch.nn.Module) -> list[torch.Tensor]:
    """What travels: the parameters that train (in ``named_parameters`` order, the same in every
    forked copy). Under LoRA only the adapters (and ``modules_to_save`` / a trained head) require grad."""
    return [p for p in module.parameters() if p.requires_grad]


@dataclass
class SyncStats:
    """syncs: weight versions sent (or received); bytes: per sync; seconds: total trainer time spent
    in syncs (copy into the buckets, issuing, waiting for the previous broadcasts)."""

    syncs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    last_seconds: float = 0.0


@dataclass
class _Bucket:
    params: list
    flat: torch.Tensor


@dataclass
class WeightSync:
    """Bucketed broadcast of ``params`` from rank 0 over ``group``. ``check`` (trainer): called
    while waiting for a broadcast, raises when a worker has died (so a dead worker is an error,
    never a hang)."""

    params: list
    group: object
    bucket_bytes: int
    check: Optional[Callable[[], None]] = None
    stats: SyncStats = field(default_factory=SyncStats)

    def __post_init__(self) -> None:
        self.buckets: list[_Bucket] = []
        cur: list = []
        for p in self.params:  # consecutive parameters of one dtype, up to bucket_bytes each
            size = sum(q.numel() * q.element_size() for q in cur)
            if cur and (cur[0].dtype != p.dtype or size + p.numel() * p.element_size() > self.bucket_bytes):
                self.buckets.append(self._bucket(cur))
                cur = []
            cur.append(p)
        if cur:
            self.buckets.append(self._bucket(cur))
        self._pending: list = []
        self.stats.bytes = sum(b.flat.numel() * b.flat.element_size() for b in self.buckets)

    @staticmethod
    def _bucket(params: list) -> _Bucket:
        return _Bucket(params, torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype))

    def _broadcast(self, flat: torch.Tensor):
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        return self.group.broadcast([flat], opts)

    def wait(self) -> None:
        """Waits for the broadcasts in flight, checking the workers while it waits."""
        for work in self._pending:
            while not work.is_completed():
                if self.check is not None:
                    self.check()
                time.sleep(0.002)
            work.wait()
        self._pending = []

    @torch.no_grad()
    def send(self) -> None:
        """Trainer: the current parameters out, one asynchronous broadcast per bucket."""
        t0 = time.perf_counter()
        self.wait()  # the buckets are reused: the previous version must have left
        for b in self.buckets:
            torch.cat([p.detach().reshape(-1).to("cpu") for p in b.params], out=b.flat)
            self._pending.append(self._broadcast(b.flat))
        self.stats.syncs += 1
        self.stats.last_seconds = time.perf_counter() - t0
        self.stats.seconds += self.stats.last_seconds

    @torch.no_grad()
    def recv(self) -> None:
        """Worker: the next version in, copied into the parameters."""
        for b in self.buckets:
            self._broadcast(b.flat).wait()
            offset = 0
            for p in b.params:
                p.copy_(b.flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        self.stats.syncs += 1
