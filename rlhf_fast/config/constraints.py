"""The value constraints of the config fields beyond their types: a check and its wording per
(section, field) in ``CHECKS``, and ``cross_checks`` between the fields of one section. Both run
when a config is validated (``config/core.py``); a failure names the dotted path and what is allowed."""

from __future__ import annotations

import math
import typing
from typing import Any

from rlhf_fast.algos import schedules
from rlhf_fast.algos.hparams import PPOHyperParams
from rlhf_fast.algos.off_policy import off_policy_correction_names
from rlhf_fast.algos.old_logprobs import OLD_LOGPROB_SOURCES, old_logprob_source_names
from rlhf_fast.algos.truncation import AFTER_STOP, MISSING_STOP_PENALTIES
from rlhf_fast.models.layouts import critic_layout_names
from rlhf_fast.models.precision import PRECISIONS, precision_names
from rlhf_fast.config.sections import (
    DataConfig, DeepSpeedConfig, LoggingConfig, LoRAConfig, ModelConfig, OptimConfig, PPOLoggingConfig, SchedulerConfig,
)
from rlhf_fast.config.stages import AsyncRolloutConfig, GenerationConfig, PPOConfig, RewardConfig, RMConfig, SFTConfig

_POSITIVE = "a number > 0"
CHECKS: dict[tuple[type, str], tuple[typing.Callable[[Any], bool], str]] = {
    (OptimConfig, "lr"): (lambda v: v > 0, _POSITIVE),
    (OptimConfig, "betas"): (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    (OptimConfig, "eps"): (lambda v: v > 0, _POSITIVE),
    (OptimConfig, "weight_decay"): (lambda v: v >= 0, "a number >= 0"),
    (SchedulerConfig, "warmup_steps"): (lambda v: v >= 0, "an integer >= 0"),
    (SchedulerConfig, "warmup_ratio"): (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    (SchedulerConfig, "min_lr_ratio"): (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    (DeepSpeedConfig, "zero_stage"): (lambda v: v in (0, 1, 2, 3), "one of 0, 1, 2, 3"),
    (DeepSpeedConfig, "grad_accum"): (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    (DeepSpeedConfig, "grad_clip"): (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    (DeepSpeedConfig, "timeout_s"): (lambda v: v is None or (math.isfinite(v) and v > 0),
                                     "a number of seconds > 0 or null (DeepSpeed's 30 minutes)"),
    (DataConfig, "eval_fraction"): (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


class _OneOf:
    """The wording of a field that names a registry entry (``what``): the registry's names, read
    when shown (a variant registered after import is listed too)."""

    def __init__(self, what: str, names: typing.Callable[[], tuple], none: bool = False):
        self.what, self.names, self.none = what, names, none

    def __str__(self) -> str:  # the wording a Literal field had: "one of 'a', 'b'"
        return "one of " + ", ".join(repr(n) for n in self.names()) + (" or null" if self.none else "")


def _registry_field(cls, name: str, what: str, names: typing.Callable[[], tuple], *, none: bool = False) -> None:
    """``cls.name`` must name an entry of a registry below config (docs/architecture.md, "Variation
    points"), read when the value is checked, so the field is a plain ``str`` and config never lists
    or compares the names itself."""
    CHECKS[(cls, name)] = (lambda v: (none and v is None) or v in names(), _OneOf(what, names, none))


def _rm_normalization_names() -> tuple[str, ...]:
    from rlhf_fast.models.reward import rm_normalization_names  # imported on use: it loads transformers

    return rm_normalization_names()


def _rm_normalization(name: str):
    from rlhf_fast.models.reward import RM_NORMALIZATIONS  # imported on use: it loads transformers

    return RM_NORMALIZATIONS[name]


def _policy_wrapper_names() -> tuple[str, ...]:
    from rlhf_fast.models.wrappers import policy_wrapper_names  # imported on use: it loads transformers

    return policy_wrapper_names()


_registry_field(SchedulerConfig, "decay", "learning-rate schedule", schedules.lr_schedule_names)
_registry_field(DeepSpeedConfig, "dtype", "precision", precision_names)
_registry_field(RMConfig, "normalization", "reward normalisation", _rm_normalization_names)
_registry_field(GenerationConfig, "missing_stop_penalty", "missing-stop penalty", MISSING_STOP_PENALTIES.names,
                none=True)
_registry_field(GenerationConfig, "after_stop", "after-stop treatment", AFTER_STOP.names)
_registry_field(PPOConfig, "critic", "critic layout", critic_layout_names)
_registry_field(PPOConfig, "old_logprobs", "old log-prob source", old_logprob_source_names)
_registry_field(AsyncRolloutConfig, "correction", "off-policy correction", off_policy_correction_names)
_registry_field(PPOConfig, "lr_schedule_unit", "learning-rate schedule unit", schedules.LR_SCHEDULE_UNITS.names)
_registry_field(PPOConfig, "policy_wrapper", "policy wrapper", _policy_wrapper_names)

for _cls in (LoggingConfig, PPOLoggingConfig):
    CHECKS[(_cls, "log_every")] = (lambda v: v >= 1, "an integer >= 1")
    CHECKS[(_cls, "eval_every")] = (lambda v: v >= 0, "an integer >= 0")
    CHECKS[(_cls, "save_every")] = (lambda v: v is None or v >= 0, "an integer >= 0 (0 = only at the end) or null")
    CHECKS[(_cls, "keep_checkpoints")] = (lambda v: v >= 0, "an integer >= 0")
    CHECKS[(_cls, "preempt_grace_s")] = (lambda v: v is None or (math.isfinite(v) and v >= 0),
                                         "a number of seconds >= 0 (0 = stop at once) or null (wait for the step)")
CHECKS[(PPOLoggingConfig, "samples_per_iteration")] = (lambda v: v >= 0, "an integer >= 0")
for _stage in (SFTConfig, RMConfig):
    for _name in ("batch_size", "micro_batch_size", "eval_batch_size"):
        CHECKS[(_stage, _name)] = (lambda v: v >= 1, "an integer >= 1")
    CHECKS[(_stage, "epochs")] = (lambda v: v > 0, _POSITIVE)
    for _name in ("max_steps", "stop_after_steps"):
        CHECKS[(_stage, _name)] = (lambda v: v is None or v >= 1, "an integer >= 1 or null")
CHECKS[(RMConfig, "normalization_samples")] = (lambda v: v >= 2, "an integer >= 2")
CHECKS[(RMConfig, "sample_temperature")] = (lambda v: v is None or v > 0, "a number > 0 or null")
CHECKS[(RMConfig, "sample_max_new_tokens")] = (lambda v: v >= 1, "an integer >= 1")
for _name in ("max_new_tokens", "max_batch_size"):
    CHECKS[(GenerationConfig, _name)] = (lambda v: v >= 1, "an integer >= 1")
CHECKS[(GenerationConfig, "min_new_tokens")] = (lambda v: v >= 0, "an integer >= 0")
CHECKS[(GenerationConfig, "truncate_min_length")] = (lambda v: v >= 0, "an integer >= 0")
def _decode_modes() -> tuple[str, ...]:
    from rlhf_fast.engine import decode_modes  # the engine's registry (imported on use: it loads transformers)

    return decode_modes()


CHECKS[(GenerationConfig, "decode")] = (lambda v: v in _decode_modes(),
                                         "a decode path: auto, eager, static, compiled or one registered in "
                                         "rlhf_fast.engine.DECODERS")
def _backend_names() -> tuple[str, ...]:
    from rlhf_fast.engine import backend_names  # the engine's registry (imported on use: it loads transformers)

    return backend_names()


CHECKS[(GenerationConfig, "backend")] = (lambda v: v in _backend_names(),
                                         "a generation backend: hybrid, hf_generate or one registered in "
                                         "rlhf_fast.engine.BACKENDS")
CHECKS[(GenerationConfig, "temperature")] = (lambda v: v > 0, _POSITIVE)
CHECKS[(GenerationConfig, "top_k")] = (lambda v: v >= 0, "an integer >= 0 (0 = off)")
CHECKS[(GenerationConfig, "top_p")] = (lambda v: 0 < v <= 1, "a number in (0, 1]")
CHECKS[(RewardConfig, "batch_size")] = (lambda v: v >= 1, "an integer >= 1")
for _name in ("iterations", "rollout_batch_size", "samples_per_prompt", "eval_prompts"):
    CHECKS[(PPOConfig, _name)] = (lambda v: v >= 1, "an integer >= 1")
CHECKS[(PPOConfig, "logprob_gap_every")] = (lambda v: v >= 1, "an integer >= 1")
CHECKS[(PPOConfig, "logits_budget_mb")] = (lambda v: v > 0, _POSITIVE)
CHECKS[(PPOConfig, "critic_lr_ratio")] = (lambda v: v is None or v > 0, "a number > 0 or null")
CHECKS[(PPOConfig, "stop_after_iterations")] = (lambda v: v is None or v >= 1, "an integer >= 1 or null")
# seeds: per-rank and per-iteration seeds are derived from them (seed + rank * 100003, ...) and must
# stay inside torch's and the sampler's int64 range
for _stage in (SFTConfig, RMConfig, PPOConfig):
    CHECKS[(_stage, "seed")] = (lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)")
CHECKS[(AsyncRolloutConfig, "max_staleness")] = (lambda v: v >= 0, "an integer >= 0 (0 = synchronous)")
CHECKS[(AsyncRolloutConfig, "workers")] = (lambda v: v is None or v >= 0,
                                            "an integer >= 0 (0 = the trainer generates) or null")
CHECKS[(AsyncRolloutConfig, "importance_weight_cap")] = (lambda v: v > 0, _POSITIVE)
CHECKS[(AsyncRolloutConfig, "bucket_mb")] = (lambda v: v > 0, _POSITIVE)
CHECKS[(LoRAConfig, "rank")] = (lambda v: v >= 0, "an integer >= 0 (0 = off)")
CHECKS[(LoRAConfig, "alpha")] = (lambda v: v > 0, _POSITIVE)
CHECKS[(LoRAConfig, "dropout")] = (lambda v: 0 <= v < 1, "a number in [0, 1)")
CHECKS[(ModelConfig, "init_seed")] = (lambda v: 0 <= v < 2**31, "an integer in [0, 2**31)")


def _check_env(cfg: "PPOConfig", path: str) -> None:
    """``ppo.env``: what multi-turn episodes need and what they replace (docs/architecture.md,
    "Multi-turn episodes")."""
    from rlhf_fast.engine import BACKENDS  # imported on use, as below

    g = cfg.generation
    if not BACKENDS[g.backend].runs_episodes:
        raise ValueError(f"{path}.env needs a generation backend that runs episodes; {path}.generation.backend "
                         f"{g.backend!r} does not (use 'hybrid')")
    if cfg.reward.model_path is not None or cfg.reward.function is not None:
        raise ValueError(f"{path}.env scores the episodes (its last reward): leave {path}.reward.model_path and "
                         f"{path}.reward.function empty")
    if isinstance(cfg.env_max_turns, bool) or not isinstance(cfg.env_max_turns, int) or cfg.env_max_turns < 1:
        raise ValueError(f"{path}.env_max_turns must be an int >= 1, got {cfg.env_max_turns!r}")
    if g.min_new_tokens or not g.stop_during_generation or AFTER_STOP[g.after_stop].trains_after_stop:
        raise ValueError(f"{path}.env: a model turn ends at its stop token, so {path}.generation.min_new_tokens must "
                         f"be 0, stop_during_generation true and after_stop 'masked'")
    if ":" not in cfg.env:
        from rlhf_fast.envs import ENVIRONMENTS

        if cfg.env not in ENVIRONMENTS:
            raise ValueError(f"{path}.env {cfg.env!r} is not a registered environment ({sorted(ENVIRONMENTS)}) nor "
                             "'package.module:Class'")
    if cfg.algo.dynamic_sampling:
        raise ValueError(f"{path}.env does not support {path}.algo.dynamic_sampling yet (episodes are not re-drawn)")


def _check_logprob_distribution(cfg: "PPOConfig", path: str) -> None:
    """The log-probs' distribution must be one the sampler can reproduce (issue 18: the ratio compares
    the distribution the tokens were drawn from)."""
    hp, g = cfg.algo, cfg.generation
    top_k = g.top_k if hp.top_k is None else hp.top_k
    top_p = g.top_p if hp.top_p is None else hp.top_p
    filtered = bool(top_k) or top_p < 1.0
    if hp.ref_filter and not filtered:
        raise ValueError(f"{path}.algo.ref_filter needs a sampling filter ({path}.generation.top_k > 0 or "
                         f"{path}.generation.top_p < 1): there is none to apply to the reference")
    if top_p < 1.0 and hp.temperature != g.temperature:
        raise ValueError(f"top_p {top_p} filters the log-probs, but {path}.algo.temperature ({hp.temperature}) differs "
                         f"from {path}.generation.temperature ({g.temperature}): the top-p set depends on the "
                         "temperature, so the log-probs would not be under the distribution the tokens were drawn from")
    if OLD_LOGPROB_SOURCES[cfg.old_logprobs].from_rollout:
        from rlhf_fast.engine import BACKENDS  # imported on use, as above

        if not BACKENDS[g.backend].logprobs_match_trainer:
            raise ValueError(f"{path}.old_logprobs 'rollout' takes the engine's log-probs as the trainer's, but "
                             f"{path}.generation.backend {g.backend!r} computes them with other code: use 'recompute'")
        if hp.temperature != g.temperature or top_k != g.top_k or top_p != g.top_p:
            raise ValueError(f"{path}.old_logprobs 'rollout' takes the engine's log-probs, drawn at "
                             f"{path}.generation.temperature / top_k / top_p ({g.temperature} / {g.top_k} / {g.top_p}); "
                             f"the trainer's are at algo's ({hp.temperature} / {top_k} / {top_p}): make them equal "
                             "or use 'recompute'")
        if not g.do_sample:
            raise ValueError(f"{path}.old_logprobs 'rollout' needs {path}.generation.do_sample (greedy decoding "
                             "records no sampling distribution)")


def _grads_in_params(cfg: "PPOConfig") -> bool:
    """The precision's engine leaves whole gradients in ``.grad`` (``models.precision.PRECISIONS``)."""
    return PRECISIONS[cfg.deepspeed.dtype].grads_in_params


def _check_async_rollouts(cfg: "PPOConfig", path: str) -> None:
    """``ppo.rollout``: staleness needs workers; the decoupled objective needs the proximal log-probs
    recomputed; a worker holds a whole copy of the policy (no ZeRO-3 partitions)."""
    r = cfg.rollout
    if r.max_staleness and not r.worker_count:
        raise ValueError(f"{path}.rollout.max_staleness {r.max_staleness} needs {path}.rollout.workers >= 1 (the "
                         "trainer alone cannot generate while it updates)")
    if r.max_staleness and OLD_LOGPROB_SOURCES[cfg.old_logprobs].from_rollout:
        raise ValueError(f"{path}.old_logprobs 'rollout' with {path}.rollout.max_staleness {r.max_staleness}: the "
                         "decoupled objective clips against the proximal policy (the trainer's weights at the start of "
                         "the update), whose log-probs must be recomputed; use 'recompute' (the engine's log-probs are "
                         "the behaviour policy's, used for the importance weight)")
    if r.worker_count and cfg.deepspeed.zero_stage == 3:
        raise ValueError(f"{path}.rollout.workers needs {path}.deepspeed.zero_stage 0-2: a rollout worker holds a whole "
                         "copy of the policy, and ZeRO-3 keeps only partitions of it in the trainer")


def cross_checks(cfg, path: str) -> None:
    """Constraints between fields of one section."""
    if isinstance(cfg, DeepSpeedConfig):
        if cfg.offload_optimizer and cfg.zero_stage == 0:
            raise ValueError(f"{path}.offload_optimizer needs {path}.zero_stage >= 1 (got 0)")
        if cfg.offload_params and cfg.zero_stage != 3:
            raise ValueError(f"{path}.offload_params needs {path}.zero_stage 3 (got {cfg.zero_stage})")
    if isinstance(cfg, PPOHyperParams):
        try:
            cfg.validate()
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    if isinstance(cfg, GenerationConfig) and cfg.min_new_tokens > cfg.max_new_tokens:
        raise ValueError(f"{path}.min_new_tokens ({cfg.min_new_tokens}) exceeds {path}.max_new_tokens ({cfg.max_new_tokens})")
    if isinstance(cfg, GenerationConfig) and AFTER_STOP[cfg.after_stop].trains_after_stop \
            and (cfg.stop_during_generation or cfg.stop_at_eos):
        raise ValueError(
            f"{path}.after_stop 'trained' trains on the tokens sampled after the stop token, but "
            f"{'stop_during_generation' if cfg.stop_during_generation else 'stop_at_eos'} is true, so none are sampled: set "
            f"{path}.stop_during_generation false and {path}.stop_at_eos false (put the EOS token in {path}.stop_tokens "
            f"to truncate at it), or {path}.after_stop masked")
    if isinstance(cfg, RewardConfig) and cfg.model_path is not None and cfg.function is not None:
        raise ValueError(f"{path}: give reward.model_path or reward.function, not both")
    if isinstance(cfg, RMConfig) and cfg.normalize_before and not _rm_normalization(cfg.normalization).samples_policy:
        raise ValueError(
            f"{path}.normalize_before needs {path}.normalization 'policy_samples' (got {cfg.normalization!r}): the "
            f"before-training normalisation scores samples of the initial policy (N details #9); set "
            f"{path}.normalize_before false or {path}.normalization policy_samples"
        )
    if isinstance(cfg, PPOConfig):
        _check_logprob_distribution(cfg, path)
        _check_async_rollouts(cfg, path)

    if isinstance(cfg, PPOConfig) and cfg.env is not None:
        _check_env(cfg, path)
    if isinstance(cfg, PPOConfig) and cfg.algo.dynamic_sampling and cfg.samples_per_prompt < 2:
        raise ValueError(f"{path}.algo.dynamic_sampling filters groups of samples: set {path}.samples_per_prompt >= 2 "
                         f"(got {cfg.samples_per_prompt})")
    if isinstance(cfg, PPOConfig) and cfg.algo.joint_grad_clip and (cfg.deepspeed.zero_stage or not _grads_in_params(cfg)):
        raise ValueError(f"{path}.algo.joint_grad_clip clips the policy's and the critic's gradients together before "
                         f"either engine steps, which needs whole fp32 gradients: {path}.deepspeed.zero_stage 0 and "
                         f"{path}.deepspeed.dtype fp32 (got {cfg.deepspeed.zero_stage} / {cfg.deepspeed.dtype}); or set "
                         f"{path}.algo.joint_grad_clip false (each model's norm clipped on its own)")
    if isinstance(cfg, PPOConfig) and cfg.frozen_zero3 and cfg.ref_on_cpu:
        raise ValueError(f"{path}.frozen_zero3 and {path}.ref_on_cpu exclude each other: shard the frozen "
                         "reference over the ranks or keep it whole on the CPU")
    if isinstance(cfg, PPOConfig) and cfg.lora.rank and cfg.ref_on_cpu:
        raise ValueError(f"{path}.ref_on_cpu has nothing to move with {path}.lora.rank {cfg.lora.rank}: the reference "
                         f"is the policy with its adapters disabled, no copy exists; set {path}.ref_on_cpu false")
    if isinstance(cfg, PPOConfig) and cfg.lora.rank and cfg.lora.dropout:
        raise ValueError(f"{path}.lora.dropout must be 0 in PPO (got {cfg.lora.dropout}): with dropout the first "
                         "minibatch's ratio is not 1 (N details #13, TRL #454)")
    if isinstance(cfg, (SFTConfig, RMConfig)) and cfg.max_tokens_per_micro_batch is not None \
            and cfg.max_tokens_per_micro_batch < 1:
        raise ValueError(f"{path}.max_tokens_per_micro_batch must be None or >= 1, got {cfg.max_tokens_per_micro_batch}")
    if isinstance(cfg, (SFTConfig, RMConfig)) and cfg.batch_size % cfg.micro_batch_size:
        raise ValueError(
            f"{path}.batch_size ({cfg.batch_size}) must be a multiple of {path}.micro_batch_size ({cfg.micro_batch_size})"
        )
