"""The one place that starts torch.distributed and builds DeepSpeed engines.

- ``init_distributed``: works under ``torchrun`` / the ``deepspeed`` launcher (reads RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and as a plain single process (fills in a 1-rank
  group on 127.0.0.1 and a free port). NCCL on CUDA, gloo on CPU.
- ``seed_everything``: seed + rank * 100003 ("The N Implementation Details of RLHF with PPO" #6).
- ``build_engine``: AdamW (torch's, or DeepSpeed's CPU Adam when the optimizer is offloaded),
  warm-up + linear / cosine decay (``WarmupDecayLR``), the TF-style Adam epsilon, ZeRO 0-3,
  bf16 / fp16 / fp32, offload, accumulation and clipping, from the typed config sections.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import datetime
import math
import os
import random
import socket
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from rlhf_fast.algos.schedules import LR_SCHEDULE_UNITS, lr_factor
from rlhf_fast.config import BatchPlan, DeepSpeedConfig, OptimConfig, SchedulerConfig
from rlhf_fast.config.sections import fused_adamw
from rlhf_fast.models.precision import PRECISIONS, cpu_has_fast_matmul

SEED_STRIDE = 100003  # N details #6: a different seed per process


@dataclass(frozen=True)
class DistInfo:
    """rank / world_size / local_rank of this process and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_deepspeed() -> None:
    import logging

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


#: torch.distributed backend -> whether its ranks run on CUDA devices; the default per CUDA availability
BACKEND_ON_CUDA = {"nccl": True, "gloo": False}
DEFAULT_BACKEND = {True: "nccl", False: "gloo"}


def init_distributed(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> DistInfo:
    """Joins (or creates) the default process group; idempotent. ``backend`` None: NCCL when CUDA
    is available, else gloo. ``timeout_s``: how long a collective waits for the other ranks
    (``deepspeed.timeout_s``; None: DeepSpeed's 30 minutes; the first call sets it). Without a
    launcher, a 1-rank group on 127.0.0.1 and a free port."""
    _quiet_deepspeed()
    import deepspeed

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    backend = backend or DEFAULT_BACKEND[torch.cuda.is_available()]
    if not dist.is_initialized():
        timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, **timeout)
        atexit.register(_destroy_process_group_at_exit)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and BACKEND_ON_CUDA[backend]:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


def _destroy_process_group_at_exit() -> None:
    """Ends the process group this module started, before the interpreter tears down: left to
    the static destructors at exit, a gloo group's worker threads are sometimes destroyed while
    still joinable and the rank aborts ("terminate called without an active exception", SIGABRT;
    seen on one rank of a 2-rank ZeRO-3 PPO run after it had written its model). Local: no
    collective, so a rank that finishes first does not wait for the others."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # already torn down by the user, or a backend that refuses: nothing to save
            pass


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seeds python, numpy and torch with ``seed + rank * 100003`` (N details #6); returns it."""
    s = seed + rank * SEED_STRIDE
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


# ---- schedule and TF-style epsilon -----------------------------------------------------------------


def warmup_steps_of(sched: SchedulerConfig, total_steps: int) -> int:
    return sched.warmup_steps or int(round(sched.warmup_ratio * total_steps))


class WarmupDecayLR(torch.optim.lr_scheduler.LambdaLR):
    """``lr_factor`` as a torch scheduler (DeepSpeed steps it once per optimizer step).

    With ``tf_eps=(eps, beta2)`` it also sets each param group's ``eps`` before every optimizer
    step to ``eps / sqrt(1 - beta2 ** t)`` (t = the 1-based step about to run). PyTorch's Adam
    computes ``m_hat / (sqrt(v_hat) + eps)``; TF's computes ``lr_t * m / (sqrt(v) + eps)`` with
    ``lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)``; the two agree exactly when PyTorch's eps is
    TF's eps divided by ``sqrt(1 - beta2^t)`` (N details, "PyTorch Adam vs TF Adam"). Any Adam that
    reads ``group["eps"]`` at each step (torch, DeepSpeed CPU / fused Adam) is covered.


    ``steps_per_unit`` > 1 holds the lr for that many optimizer steps: step s uses
    ``lr_factor(s // steps_per_unit)`` and ``total_steps`` / ``warmup_steps`` count units (one PPO
    iteration's optimizer steps, for ``ppo.lr_schedule_unit`` "iteration"). The TF epsilon
    still follows the optimizer steps (Adam's t).
    """

    def __init__(self, optimizer, *, total_steps: int, warmup_steps: int, decay: str, min_ratio: float = 0.0,
                 tf_eps: Optional[tuple[float, float]] = None, steps_per_unit: int = 1):
        if steps_per_unit < 1:
            raise ValueError(f"steps_per_unit must be >= 1, got {steps_per_unit}")
        self.tf_eps, self.steps_per_unit = tf_eps, int(steps_per_unit)
        fn = lambda step: lr_factor(step // self.steps_per_unit, total_steps=total_steps,  # noqa: E731
                                    warmup_steps=warmup_steps, decay=decay, min_ratio=min_ratio)
        super().__init__(optimizer, fn)

    def step(self, epoch=None):
        super().step() if epoch is None else super().step(epoch)
        self._set_eps()

    def _set_eps(self):
        if self.tf_eps is None:
            return
        eps, beta2 = self.tf_eps
        t = self.last_epoch + 1  # LambdaLR starts at last_epoch 0 before the first optimizer step
        for group in self.optimizer.param_groups:
            group["eps"] = eps / math.sqrt(1.0 - beta2**t)

    def state_dict(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        return state

    def load_state_dict(self, state_dict):
        self.__dict__.update(state_dict)
        self._set_eps()


# ---- the engine --------------------------------------------------------------------------------------


def warn_slow_cpu_precision(ds: DeepSpeedConfig, *, field: str = "deepspeed.dtype") -> None:
    """A reduced-precision run on a CPU without native matmuls for it warns (it runs, slowly)."""
    if torch.cuda.is_available() or cpu_has_fast_matmul(ds.dtype):
        return
    warnings.warn(f"{field} {ds.dtype} on a CPU whose oneDNN has no native {ds.dtype} matrix multiply (torch's "
                  f"CPU capability: {torch.backends.cpu.get_cpu_capability()}): {ds.dtype} matmuls are converted "
                  f"and can be tens of times slower than fp32 here; fp32 is the fast CPU setting on this machine",
                  stacklevel=2)


def deepspeed_config_dict(ds: DeepSpeedConfig, plan: BatchPlan) -> dict:
    """The DeepSpeed JSON config for these sections (batch geometry from the resolved plan).
    Warns for a reduced precision the CPU cannot multiply natively (``warn_slow_cpu_precision``)."""
    warn_slow_cpu_precision(ds)
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage > 0 and not torch.cuda.is_available():
        zero["reduce_scatter"] = False  # gloo has no reduce_scatter: ZeRO-1/2 reduce with all-reduce
        zero["overlap_comm"] = False
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        "train_batch_size": plan.batch_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    cfg.update(copy.deepcopy(PRECISIONS[ds.dtype].train_section))
    return cfg


def make_optimizer(params, optim: OptimConfig, *, offload: bool):
    """AdamW over ``params``; DeepSpeed's CPU Adam (built on first use) when offloaded, since ZeRO
    offload steps on the CPU."""
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    # optim.fused "auto": fused with CUDA, torch's per-tensor loop on a CPU (11x the fused step over
    # 78 M parameters in one thread: issue 35's peer grid, benchmarks/PEERS.md); true: fused anywhere
    fused = fused_adamw(optim.fused, torch.cuda.is_available())
    return torch.optim.AdamW(params, **kwargs, **({"fused": True} if fused else {}))


def make_scheduler(optimizer, *, optim: OptimConfig, sched: SchedulerConfig, total_steps: int,
                   steps_per_unit: int = 1) -> WarmupDecayLR:
    """The schedule of ``sched`` over ``total_steps`` units of ``steps_per_unit`` optimizer steps,
    with the TF-style epsilon when ``optim.tf_adam_eps``; eps is already set for step 1."""
    scheduler = WarmupDecayLR(
        optimizer, total_steps=total_steps, warmup_steps=warmup_steps_of(sched, total_steps), decay=sched.decay,
        min_ratio=sched.min_lr_ratio, tf_eps=(optim.eps, optim.betas[1]) if optim.tf_adam_eps else None,
        steps_per_unit=steps_per_unit,
    )
    scheduler._set_eps()  # eps of step 1
    return scheduler


def ppo_schedule(unit: str, *, iterations: int, steps_per_iteration: int) -> dict:
    """``build_engine`` / ``make_scheduler`` arguments for ``ppo.lr_schedule_unit``:
    "optimizer_step" decays over every optimizer step, "iteration" holds the lr for the
    ``steps_per_iteration`` optimizer steps of one PPO iteration and decays over ``iterations``
    (openai/lm-human-preferences ``train_policy.py`` ``train_minibatch``)."""
    if unit not in LR_SCHEDULE_UNITS:
        raise ValueError(f"ppo.lr_schedule_unit must be one of {LR_SCHEDULE_UNITS.names()}, got {unit!r}")
    per_unit = steps_per_iteration if LR_SCHEDULE_UNITS[unit] else 1
    return dict(total_steps=iterations * steps_per_iteration // per_unit, steps_per_unit=per_unit)


def build_engine(model: torch.nn.Module, *, optim: OptimConfig, sched: SchedulerConfig, ds: DeepSpeedConfig,
                 plan: BatchPlan, total_steps: int, steps_per_unit: int = 1):
    """``deepspeed.initialize`` with our optimizer and schedule (``make_scheduler``). Returns the
    engine; the optimizer and scheduler are ``engine.optimizer`` / ``engine.lr_scheduler``."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, optim, offload=ds.offload_optimizer)
    scheduler = make_scheduler(optimizer, optim=optim, sched=sched, total_steps=total_steps,
                               steps_per_unit=steps_per_unit)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config_dict(ds, plan),
        dist_init_required=False,
    )
    return engine


def build_zero3_inference(model: torch.nn.Module, *, ds: DeepSpeedConfig, micro_batch_size: int):
    """``deepspeed.initialize`` of a frozen model with ZeRO-3 and no optimizer: its parameters are
    partitioned over the ranks and gathered module by module during each forward (ZeRO-3
    inference). Every rank must then run the same forwards (the gathers are collectives). Returns
    the engine; call ``engine.module`` (its hooks do the gathering)."""
    import deepspeed

    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"} if ds.offload_params else None},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if cfg["zero_optimization"]["offload_param"] is None:
        del cfg["zero_optimization"]["offload_param"]
    cfg.update(copy.deepcopy(PRECISIONS[ds.dtype].inference_section))
    model.requires_grad_(False).eval()
    engine, _, _, _ = deepspeed.initialize(model=model, config=cfg, dist_init_required=False)
    return engine


@contextlib.contextmanager
def full_parameters(module: torch.nn.Module, zero_stage: int):
    """Under ZeRO-3, every rank gathers ``module``'s partitioned parameters for the block (read
    only: nothing is scattered back); a no-op at other stages. Every rank must enter it."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sums a list of floats over ranks (float64; one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is True on any rank (one all-reduce when a group of several ranks runs;
    ``flag`` itself otherwise). For decisions every rank must take together."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    on_cuda = BACKEND_ON_CUDA.get(str(dist.get_backend()), False)
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    return all_reduce_sum([float(flag)], device)[0] > 0
