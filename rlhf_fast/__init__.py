"""rlhf_fast: RLHF + PPO with fused kernels, a hybrid generation engine and a DeepSpeed PPO loop.

Entry points (README "From Python"): the stage trainers ``rlhf_fast.trainers.sft.SFTTrainer``,
``rlhf_fast.trainers.rm.RMTrainer`` and ``rlhf_fast.trainers.ppo.PPOTrainer`` (``Trainer(cfg,
output_dir).fit()``), their typed configs in ``rlhf_fast.config`` (``load_config`` for presets and
overrides), ``rlhf_fast.trainers.pipeline.run_pipeline`` for all three, and the building blocks in
``rlhf_fast.models``, ``rlhf_fast.data``, ``rlhf_fast.algos``, ``rlhf_fast.engine`` and ``rlhf_fast.ops``.
"""

from rlhf_fast import _threads  # noqa: F401  (first: OpenMP's wait policy is fixed when torch loads)
from rlhf_fast import _malloc  # noqa: F401  (glibc keeps multi-MB blocks for reuse: rlhf_fast/_malloc.py)

import sys as _sys

from rlhf_fast._source_folders import map_source_folders as _map_source_folders

_map_source_folders(_sys.modules[__name__])  # rlhf_fast.kernels / rlhf_fast._csrc in a checkout

__version__ = "0.1.0"
