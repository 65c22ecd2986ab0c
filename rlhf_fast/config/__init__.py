"""Typed run configuration: one dataclass per concern, a docstring under every field, YAML files,
dotted command-line overrides and named presets.

    cfg = load_config("run.yaml", presets=["ci"], overrides=["--rm.lr", "3e-6", "--sft.deepspeed.zero_stage=2"])
    cfg.rm.optim.lr            # 3e-06

Sections (the fields of ``RunConfig``) are stages: ``sft``, ``rm``, ``ppo``; a new stage is one line
in ``RunConfig``. Inside a stage, shared concerns are sub-sections: ``model``, ``data``, ``optim``,
``scheduler``, ``deepspeed``, ``logging``. A dotted path may skip the sub-section when the leaf
name is unique within the stage: ``--rm.lr`` means ``--rm.optim.lr``, ``--sft.zero_stage`` means
``--sft.deepspeed.zero_stage``.

Every error (unknown field, wrong type, value out of range) is a ``ValueError`` naming the dotted
path and what is allowed. Values derived from several fields (the batch plan) are computed once,
by ``BatchPlan.resolve``, when the world size is known.

Modules: ``sections`` (the shared sub-sections), ``stages`` (the stage configs), ``constraints``
(value constraints beyond the types), ``presets`` (the named presets), ``core`` (coercion, validation, paths, overrides, loading, the batch plan, docs).
"""

from rlhf_fast.config.core import (
    BatchPlan, apply_preset, describe, dump_yaml, field_docs, from_dict, load_config, load_yaml, parse_overrides,
    resolve_path, set_path, to_dict, update, validate,
)
from rlhf_fast.config.sections import (
    DataConfig, DeepSpeedConfig, LoggingConfig, LoRAConfig, ModelConfig, OptimConfig, PPOLoggingConfig, SchedulerConfig,
)
from rlhf_fast.config.presets import PRESETS
from rlhf_fast.config.stages import AsyncRolloutConfig, GenerationConfig, PPOConfig, RewardConfig, RMConfig, RunConfig, SFTConfig

__all__ = [
    "AsyncRolloutConfig", "BatchPlan", "DataConfig", "DeepSpeedConfig", "GenerationConfig", "LoggingConfig", "LoRAConfig", "ModelConfig",
    "OptimConfig", "PPOConfig", "PPOLoggingConfig", "PRESETS", "RMConfig", "RewardConfig", "RunConfig", "SFTConfig",
    "SchedulerConfig", "apply_preset",
    "describe", "dump_yaml", "field_docs", "from_dict", "load_config", "load_yaml", "parse_overrides", "resolve_path",
    "set_path", "to_dict", "update", "validate",
]
