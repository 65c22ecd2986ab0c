"""masked_whiten / masked_mean / masked_var with a process group: statistics over all ranks.
One small test: 2 CPU processes on a gloo group; each rank checks its slice of the global answer."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _data(rank: int):
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(3 + rank, 17, generator=gen) * (1 + rank) + 5.0 * rank  # ranks differ in shape and stats
    m = torch.rand(x.shape, generator=gen) < 0.6
    m[0] = False  # an empty row on each rank
    return x, m


def _worker(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import rlhf_fast.ops as ops
        from rlhf_fast.reference import rlmath as ref

        x, m = _data(rank)
        xs, ms = zip(*(_data(r) for r in range(world)))
        flat_x = torch.cat([a[b] for a, b in zip(xs, ms)]).double()
        group = dist.group.WORLD
        for unbiased in (True, False):
            mean = flat_x.mean()
            var = flat_x.var(correction=1 if unbiased else 0)
            torch.testing.assert_close(ops.masked_mean(x, m, group=group).double(), mean, atol=1e-6, rtol=0)
            torch.testing.assert_close(ops.masked_var(x, m, unbiased=unbiased, group=group).double(), var,
                                       atol=1e-5, rtol=1e-6)
            for shift_mean in (True, False):
                expected = (x.double() - mean) / torch.sqrt(var + 1e-8) + (0 if shift_mean else mean)
                expected = torch.where(m, expected, 0.0)
                kw = dict(shift_mean=shift_mean, unbiased=unbiased, group=group)
                torch.testing.assert_close(ops.masked_whiten(x, m, **kw).double(), expected, atol=1e-5, rtol=1e-6)
                torch.testing.assert_close(ref.masked_whiten(x.double(), m, **kw), expected, atol=1e-10, rtol=0)
        # a rank with no valid token still takes part in the collective and gets zeros
        empty = torch.zeros_like(m) if rank == 1 else m
        out = ops.masked_whiten(x, empty, group=group)
        assert torch.isfinite(out).all()
        if rank == 1:
            assert torch.equal(out, torch.zeros_like(out))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_masked_whiten_over_a_two_rank_gloo_group():
    mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=True)
