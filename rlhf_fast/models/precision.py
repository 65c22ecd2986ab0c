"""Training precisions by name (``deepspeed.dtype``): what each sets, a registry below the trainers
(docs/architecture.md, "Variation points"). ``trainers/deepspeed_setup.py`` builds the DeepSpeed
config sections from the entry; the PPO trainer casts the frozen models to ``frozen_dtype``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_fast._registry import Registry


@dataclass(frozen=True)
class Precision:
    """What ``deepspeed.dtype`` sets: frozen_dtype, the dtype the frozen reference / reward models
    compute in (None: as loaded); train_section / inference_section, the DeepSpeed config keys of a
    trained engine / a ZeRO-3 inference engine (fp16 trains with dynamic loss scaling);
    grads_in_params, a ZeRO stage 0 engine leaves the averaged gradients in each parameter's ``.grad``
    before it steps (fp32; bf16 / fp16 keep them in their optimizer's fp32 buffers), which
    ``algo.joint_grad_clip`` needs (``trainers/ppo_core.py: clip_jointly``)."""

    frozen_dtype: Optional[torch.dtype]
    train_section: dict
    inference_section: dict
    cpu_matmul_probe: Optional[str] = None  # torch.ops.mkldnn's support probe (cpu_has_fast_matmul)
    grads_in_params: bool = False


PRECISIONS: Registry[Precision] = Registry("precision")
PRECISIONS.register("fp32")(Precision(None, {}, {}, grads_in_params=True))
PRECISIONS.register("bf16")(Precision(torch.bfloat16, {"bf16": {"enabled": True}}, {"bf16": {"enabled": True}},
                                      cpu_matmul_probe="_is_mkldnn_bf16_supported"))
PRECISIONS.register("fp16")(Precision(torch.float16, {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}},
                                      {"fp16": {"enabled": True}}, cpu_matmul_probe="_is_mkldnn_fp16_supported"))


def cpu_has_fast_matmul(dtype_name: str) -> bool:
    """Whether this CPU has oneDNN kernels for ``dtype_name`` matrices: what torch reports
    (``torch.ops.mkldnn._is_mkldnn_bf16_supported``: AVX-512 or AMX on x86, BF16 on Arm;
    ``_is_mkldnn_fp16_supported``: AVX512-FP16 / AMX-FP16; ``ONEDNN_MAX_CPU_ISA`` applies). Without
    them torch converts: bf16 matmuls measured ~40x slower than float32 with the ISA held at AVX2
    (2-core AMD EPYC Zen 5, torch 2.13: 2.4 vs 99 GFLOP/s at 800 x 256 x 768), ~4x faster with
    avx512_bf16. A torch without these probes counts as supported (no warning on a guess)."""
    probe = PRECISIONS[dtype_name].cpu_matmul_probe
    if probe is None:  # float32
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return True


def precision_names() -> tuple[str, ...]:
    """The values ``deepspeed.dtype`` accepts."""
    return PRECISIONS.names()
