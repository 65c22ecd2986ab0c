"""Resuming on another number of ranks (a job requeued on fewer or more GPUs).

A ZeRO 1-3 checkpoint holds one optimizer shard per rank, and DeepSpeed refuses to load it on
another data-parallel world size. When the world size a checkpoint was written with
(``trainer_state.json: world_size``) differs from the current one, ``resharded`` converts each of
its DeepSpeed states to DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``:
every parameter's fp32 weight and Adam moments as whole tensors) under
``DIR/checkpoints/.universal-step-N`` (rank 0 converts, the others wait; kept until the next save
prunes it), and ``universal_loading`` makes the engines load that instead, each rank taking its
new partition. ZeRO-0 checkpoints hold the whole optimizer state in one file and load on any world
size unchanged. What stays the same across world sizes is listed in docs/architecture.md,
"Faults".
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
from pathlib import Path
from typing import Optional

from rlhf_fast.trainers import deepspeed_setup as dss

log = logging.getLogger(__name__)


def _sharded_states(deepspeed_dir: Path) -> list[Path]:
    """The ``.../state`` directories under ``deepspeed_dir`` that hold per-rank ZeRO shards."""
    return sorted({p.parent for p in deepspeed_dir.rglob("*zero_pp_rank_*_optim_states.pt")})


def resharded(checkpoint: Path, *, saved_world_size: Optional[int], world_size: int, is_main: bool) -> Optional[Path]:
    """The ``deepspeed/`` directory to load ``checkpoint`` from with universal loading, or None
    when the plain one loads (same world size, unknown saved size, or no ZeRO shards)."""
    source = checkpoint / "deepspeed"
    if saved_world_size in (None, world_size) or not _sharded_states(source):
        return None
    target = checkpoint.parent / f".universal-{checkpoint.name}" / "deepspeed"
    failure = None
    if is_main:
        log.warning("checkpoint %s was written by %d ranks and this run has %d: converting its ZeRO shards to "
                    "DeepSpeed's universal format in %s", checkpoint, saved_world_size, world_size, target.parent)
        try:
            _convert(source, target)
        except Exception as e:  # DeepSpeed's converter: a missing or damaged shard
            failure = e
    if dss.any_rank(failure is not None):
        raise ValueError(f"checkpoint {checkpoint} (written by {saved_world_size} ranks) cannot be converted for "
                         f"{world_size} ranks ({type(failure).__name__ if failure else 'on rank 0'}: "
                         f"{str(failure)[:300]}); resume on {saved_world_size} ranks") from None
    return target


def _convert(source: Path, target: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(target.parent, ignore_errors=True)
    for state in _sharded_states(source):
        out = target / state.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.redirect_stdout(None):  # the converter prints its progress
            ds_to_universal(argparse.Namespace(input_folder=str(state), output_folder=str(out), num_extract_workers=1,
                                               num_merge_workers=1, keep_temp_folder=False, strict=True,
                                               inject_missing_state=True))


@contextlib.contextmanager
def universal_loading(engines: list):
    """DeepSpeed engines load universal checkpoints inside the block (their config's switch;
    DeepSpeed's "MPU is not provided" warning, meaningless without tensor parallelism, silenced)."""
    from deepspeed.utils import logger as ds_logger

    before, level = [e._config.load_universal_checkpoint for e in engines], ds_logger.level
    for e in engines:
        e._config.load_universal_checkpoint = True
    ds_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ds_logger.setLevel(level)
        for e, b in zip(engines, before):
            e._config.load_universal_checkpoint = b
