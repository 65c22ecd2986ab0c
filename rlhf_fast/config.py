"""Typed run configuration: one dataclass per concern, a docstring under every field, YAML files,
dotted command-line overrides and named presets.

    cfg = load_config("run.yaml", presets=["ci"], overrides=["--rm.lr", "3e-6", "--sft.deepspeed.zero_stage=2"])
    cfg.rm.optim.lr            # 3e-06

Sections (the fields of ``RunConfig``) are stages: ``sft``, ``rm``; a new stage is one line in
``RunConfig``. Inside a stage, shared concerns are sub-sections: ``model``, ``data``, ``optim``,
``scheduler``, ``deepspeed``, ``logging``. A dotted path may skip the sub-section when the leaf
name is unique within the stage: ``--rm.lr`` means ``--rm.optim.lr``, ``--sft.zero_stage`` means
``--sft.deepspeed.zero_stage``.

Every error (unknown field, wrong type, value out of range) is a ``ValueError`` naming the dotted
path and what is allowed. Values derived from several fields (the batch plan) are computed once,
by ``BatchPlan.resolve``, when the world size is known.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import os
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from rlhf_fast.algos.hparams import PRESETS as PPO_PRESETS
from rlhf_fast.algos.hparams import PPOHyperParams

# ---- the sections ------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which model a stage starts from."""

    path: Optional[str] = None
    """Local directory of a Hugging Face causal LM (or one saved by rlhf_fast). None: a fresh model
    of ``arch`` / ``size`` sized to the built-in task's tokenizer (nothing is ever downloaded)."""
    tokenizer_path: Optional[str] = None
    """Local tokenizer directory. None: ``path`` when it holds a tokenizer, else the built-in task's."""
    arch: Literal["gpt2", "llama", "gpt_neox", "qwen2"] = "gpt2"
    """Architecture of a fresh model (``rlhf_fast.tasks.tiny_config``); ignored when ``path`` is set."""
    size: Literal["test", "task"] = "task"
    """Size of a fresh model: "task" (~2.9 M parameters, the built-in task's model) or "test"."""
    config_overrides: dict = field(default_factory=dict)
    """HF config fields for a fresh model, e.g. ``{n_layer: 2}``; ignored when ``path`` is set."""
    init_seed: int = 0
    """Seed of a fresh model's weights and of new heads (same on every rank)."""
    attn_implementation: Optional[str] = None
    """Passed to transformers ("sdpa", "eager", "flash_attention_2"); None: transformers' default."""


@dataclass
class DataConfig:
    """Where the examples come from and how they are tokenised."""

    task: str = "tiny_sentiment"
    """Built-in task used when ``train_file`` is None (``rlhf_fast.tasks.get_task``)."""
    train_file: Optional[str] = None
    """JSONL file or local ``datasets`` directory. None: the built-in task's records."""
    eval_file: Optional[str] = None
    """Held-out JSONL / ``datasets`` directory. None: the last ``eval_fraction`` of the training records."""
    eval_fraction: float = 0.1
    """Share of the training records held out for evaluation when there is no ``eval_file``."""
    max_train_examples: Optional[int] = None
    """Use only the first N training records (quick runs); None: all."""
    max_eval_examples: Optional[int] = None
    """Evaluate on at most N held-out records; None: all."""
    prompt_field: str = "prompt"
    """Record field with the prompt (query)."""
    response_field: str = "response"
    """SFT: record field with the reference response."""
    chosen_field: str = "chosen"
    """RM: record field with the preferred response."""
    rejected_field: str = "rejected"
    """RM: record field with the other response."""
    max_prompt_length: Optional[int] = None
    """Prompt tokens kept (cut on the left: N+ keeps the end of the query); None: no limit."""
    max_response_length: Optional[int] = None
    """Response tokens kept, EOS included (cut on the right); None: no limit."""


@dataclass
class OptimConfig:
    """AdamW."""

    lr: float = 1e-3
    """Peak learning rate. The default suits the built-in task's 3 M-parameter model; N+ uses 3e-6
    for SFT, RM and PPO with billion-parameter models (preset ``n_plus``)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam (beta1, beta2); PyTorch's defaults, as in lm-human-preferences (TF's defaults agree)."""
    eps: float = 1e-5
    """Adam epsilon; 1e-5 as in N+ (AdamW eps 1e-5) and lm-human-preferences."""
    weight_decay: float = 0.0
    """Decoupled weight decay; 0 as in N and N+."""
    tf_adam_eps: bool = False
    """TF-style epsilon (N details, "PyTorch Adam vs TF Adam"): TF adds eps to sqrt(v) before bias
    correction, PyTorch after, so PyTorch's effective epsilon is eps * sqrt(1 - beta2^t) and early
    updates are larger. When on, the scheduler sets each step's eps to eps / sqrt(1 - beta2^t),
    which makes PyTorch's (and DeepSpeed's CPU / fused) Adam compute TF's update exactly."""


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: linear warm-up from 0, then decay to ``min_lr_ratio * lr``."""

    warmup_steps: int = 0
    """Optimizer steps of linear warm-up; ``warmup_ratio`` is used when this is 0."""
    warmup_ratio: float = 0.0
    """Warm-up as a share of the total optimizer steps (used when ``warmup_steps`` is 0)."""
    decay: Literal["linear", "cosine", "constant"] = "linear"
    """Shape after warm-up. "linear" to 0: N details #5 (lr annealed to 0 for RM training and PPO);
    "cosine": N+ SFT."""
    min_lr_ratio: float = 0.0
    """Final lr as a share of the peak; 0 = decay to 0 (N #5)."""


@dataclass
class DeepSpeedConfig:
    """How the DeepSpeed engine is built (``rlhf_fast.trainers.deepspeed_setup``)."""

    zero_stage: int = 0
    """ZeRO stage 0-3: 0 plain data parallel; 1 shards optimizer state; 2 also gradients (N+ runs
    ZeRO-2); 3 also parameters."""
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision. fp32 on CPU (the tests); bf16 on Ampere+ GPUs; fp16 uses dynamic loss scaling."""
    offload_optimizer: bool = False
    """ZeRO-Offload: optimizer state and step on the CPU (needs zero_stage >= 1; PPO-max keeps AdamW
    state on the CPU). DeepSpeed's CPU Adam is used (it is built on first use)."""
    offload_params: bool = False
    """ZeRO-Infinity parameter offload to the CPU (needs zero_stage 3)."""
    grad_accum: Optional[int] = None
    """Micro-batches per optimizer step on each rank. None: derived as
    batch_size / (micro_batch_size * world_size); when given, that product must equal batch_size."""
    grad_clip: float = 1.0
    """Clip the global gradient norm at this value; 0 turns clipping off. 1.0: DeepSpeed-Chat / OpenRLHF."""
    backend: Optional[Literal["nccl", "gloo"]] = None
    """torch.distributed backend; None: NCCL when CUDA is available, else gloo."""


@dataclass
class LoggingConfig:
    """Progress bar, metrics, TensorBoard and checkpoints."""

    log_every: int = 10
    """Optimizer steps between lines of ``DIR/metrics.jsonl`` (the last step is always logged)."""
    eval_every: int = 0
    """Optimizer steps between evaluations; 0: only at the end."""
    save_every: int = 0
    """Optimizer steps between checkpoints; 0: only at the end."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept under ``DIR/checkpoints`` (older ones are deleted); 0 keeps all."""
    tensorboard: bool = True
    """Write TensorBoard events to ``DIR/tensorboard``."""
    progress_bar: bool = True
    """tqdm bar with loss and throughput on rank 0 (also off when stderr is not a terminal and
    ``RLHF_FAST_NO_TQDM`` is set)."""


@dataclass
class SFTConfig:
    """Supervised fine-tuning of the policy on prompt + reference response."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(decay="cosine", warmup_ratio=0.05))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    loss_on: Literal["response", "all"] = "response"
    """Tokens in the loss: "response" (prompt tokens masked; TRL / DeepSpeed-Chat default) or "all"
    (query + response: N+ SFT). Padding never counts."""
    epochs: float = 2.0
    """Passes over the training data (fractions allowed); N+ uses 1."""
    max_steps: Optional[int] = None
    """Optimizer steps; overrides ``epochs`` when given."""
    stop_after_steps: Optional[int] = None
    """Stop (checkpointed) after this many optimizer steps while the schedule still spans the
    whole run: for time-limited jobs, resumed with ``--resume``."""
    batch_size: int = 64
    """Sequences per optimizer step, over all ranks and micro-batches (the global batch)."""
    micro_batch_size: int = 32
    """Sequences per forward pass on one rank."""
    eval_batch_size: int = 128
    """Sequences per forward pass in evaluation, per rank."""
    seed: int = 1
    """Seeds data order (same on every rank) and per-rank RNGs (seed + rank * 100003, N details #6)."""


@dataclass
class RMConfig:
    """Reward-model training on preference pairs (Bradley-Terry), then normalisation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4))
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sft_model: Optional[str] = None
    """SFT checkpoint (a directory written by ``rlhf-fast sft``) the RM is initialised from (N+: RM
    from the SFT model). None and no ``model.path``: ``rlhf-fast rm`` first runs the ``sft``
    section into ``DIR/sft`` and starts from that."""
    margin: float = 0.0
    """Loss -log sigmoid(r_chosen - r_rejected - margin); 0 is plain Bradley-Terry (Llama 2 adds a margin)."""
    normalization: Literal["policy_samples", "reference_mean", "reference_std", "none"] = "policy_samples"
    """After training: "policy_samples" sets gain and bias so responses sampled from the initial
    (SFT) policy score mean 0 / std 1 (N details #9); "reference_mean": bias = -mean score of the
    SFT data's reference responses (N+); "reference_std": mean 0 / std 1 on those; "none"."""
    normalization_samples: int = 512
    """Prompts (or reference responses) used to set the normalisation."""
    sample_temperature: float = 1.0
    """Sampling temperature of the policy samples used for "policy_samples" (N: 1.0, top_k 0, top_p 1)."""
    sample_max_new_tokens: int = 24
    """Response length of those samples."""
    epochs: float = 1.0
    """Passes over the pairs; 1 as in N (#5) and N+ (more over-fits)."""
    max_steps: Optional[int] = None
    """Optimizer steps; overrides ``epochs`` when given."""
    stop_after_steps: Optional[int] = None
    """Stop (checkpointed) after this many optimizer steps; the schedule still spans the whole run."""
    batch_size: int = 32
    """Pairs per optimizer step, global (N: 32... N+: 64)."""
    micro_batch_size: int = 32
    """Pairs per forward pass on one rank (each forward scores 2x that many sequences)."""
    eval_batch_size: int = 128
    """Pairs per forward pass in evaluation, per rank."""
    seed: int = 1
    """Seeds data order and per-rank RNGs (seed + rank * 100003, N details #6)."""


@dataclass
class GenerationConfig:
    """Rollout sampling and response post-processing (the hybrid engine, then truncation)."""

    max_new_tokens: int = 24
    """Tokens sampled per response (the EOS trick samples this many, then truncates; N+)."""
    do_sample: bool = True
    """Sample (True) or decode greedily (False: deterministic rollouts, used by parity tests)."""
    min_new_tokens: int = 0
    """EOS / stop tokens are blocked before this many tokens."""
    temperature: float = 0.7
    """Sampling temperature (N+ TL;DR 0.7; lm-human-preferences 0.7). ``algo.temperature`` should
    equal it: log-probs at the sampling temperature ("N details" #10)."""
    top_k: int = 0
    """Top-k filtering; 0 = off ("N details" #4: top_k 0, top_p 1)."""
    top_p: float = 1.0
    """Nucleus filtering; 1.0 = off."""
    stop_at_eos: bool = True
    """Truncate after the first EOS (the EOS trick) and stop rows that emitted it; False gives
    fixed-length responses with EOS ignored ("N details" #4)."""
    stop_tokens: list = field(default_factory=list)
    """More token strings that end a response, e.g. ["."] ("N details" #14: truncate at '.')."""
    stop_during_generation: bool = True
    """Also stop sampling a row at a stop token (saves compute); False samples the full length and
    truncates afterwards, as lm-human-preferences does."""
    truncate_min_length: int = 0
    """Only stop tokens at index >= this count ("N details" #14: '.' at or after token 16)."""
    missing_stop_penalty: Optional[Literal["replace", "subtract"]] = "replace"
    """Rows with no stop token: "replace" the score with ``missing_stop_value`` (lm-human-
    preferences, N+: -1), "subtract" it (TRL ``missing_eos_penalty``), or null (none)."""
    missing_stop_value: float = -1.0
    """The replacement score, or the amount subtracted."""
    max_batch_size: int = 256
    """Rows decoded at once by the engine (a larger rollout is decoded in chunks)."""


@dataclass
class RewardConfig:
    """Where the scores come from."""

    model_path: Optional[str] = None
    """A reward-model directory written by ``rlhf-fast rm`` (normalisation included). The
    pipeline fills it in."""
    function: Optional[str] = None
    """Instead of a model: ``package.module:function`` taking (prompts, responses) lists and
    returning one finite number per prompt; ``task:gold`` uses the built-in task's gold reward."""
    batch_size: int = 64
    """Sequences per reward-model forward."""


@dataclass
class PPOConfig:
    """PPO on the hybrid engine and DeepSpeed (``rlhf_fast.trainers.ppo``)."""

    policy: ModelConfig = field(default_factory=ModelConfig)
    """The policy to train (``policy.path``: an SFT checkpoint); the frozen reference is a copy."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts: ``data.train_file`` (a JSONL / datasets directory with ``prompt_field``) or the built-in task's."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    algo: PPOHyperParams = field(default_factory=lambda: PPO_PRESETS["tldr"].replace(temperature=0.7))
    """The PPO math (``rlhf_fast.algos.PPOHyperParams``): default the N+ TL;DR settings."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))
    """Policy optimizer. 3e-4 suits the built-in task's 3 M-parameter model (N+: 3e-6 at 1B+)."""
    critic_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4))
    """Critic optimizer (a separate critic only)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Linear decay to 0 over all optimizer steps ("N details" #5)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """``grad_clip`` is taken from ``algo.max_grad_norm``; ``grad_accum`` from the minibatch plan."""
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(log_every=1, eval_every=5))
    critic: Literal["separate", "value_head"] = "separate"
    """"separate": a critic initialised from the reward model (N+ TL;DR, PPO-max); "value_head": a
    zero-initialised value head on the policy backbone ("N details" #11)."""
    ref_on_cpu: bool = False
    """Keep the frozen reference policy on the CPU (N+ offloads reference and reward models at 6.9B)."""
    use_linear_logprobs: bool = False
    """Log-probs straight from hidden states (``ops.linear_logprobs``): the logits are never stored."""
    iterations: int = 40
    """PPO iterations (rollout + update)."""
    stop_after_iterations: Optional[int] = None
    """Stop (checkpointed) after this many iterations while the schedule spans ``iterations``."""
    rollout_batch_size: int = 64
    """Prompts per iteration over all ranks."""
    samples_per_prompt: int = 1
    """Responses per prompt (grpo / rloo groups); the rollout batch is the product."""
    eval_prompts: int = 128
    """Held-out prompts sampled at each evaluation."""
    seed: int = 1
    """Seeds prompts order, sampling (per rank and iteration) and minibatch permutations."""


@dataclass
class RunConfig:
    """All stages of a run; ``rlhf-fast <stage>`` reads its own section (and ``rm`` reads ``sft``
    when it has to train its own SFT backbone). Adding a stage is one line here."""

    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


# ---- constraints beyond the types --------------------------------------------------------------

_POSITIVE = "a number > 0"
_CHECKS: dict[tuple[type, str], tuple[typing.Callable[[Any], bool], str]] = {
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
    (DataConfig, "eval_fraction"): (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    (LoggingConfig, "log_every"): (lambda v: v >= 1, "an integer >= 1"),
    (LoggingConfig, "eval_every"): (lambda v: v >= 0, "an integer >= 0"),
    (LoggingConfig, "save_every"): (lambda v: v >= 0, "an integer >= 0"),
    (LoggingConfig, "keep_checkpoints"): (lambda v: v >= 0, "an integer >= 0"),
}
for _stage in (SFTConfig, RMConfig):
    for _name in ("batch_size", "micro_batch_size", "eval_batch_size"):
        _CHECKS[(_stage, _name)] = (lambda v: v >= 1, "an integer >= 1")
    _CHECKS[(_stage, "epochs")] = (lambda v: v > 0, _POSITIVE)
    for _name in ("max_steps", "stop_after_steps"):
        _CHECKS[(_stage, _name)] = (lambda v: v is None or v >= 1, "an integer >= 1 or null")
_CHECKS[(RMConfig, "normalization_samples")] = (lambda v: v >= 2, "an integer >= 2")
_CHECKS[(RMConfig, "sample_temperature")] = (lambda v: v > 0, _POSITIVE)
_CHECKS[(RMConfig, "sample_max_new_tokens")] = (lambda v: v >= 1, "an integer >= 1")
for _name in ("max_new_tokens", "max_batch_size"):
    _CHECKS[(GenerationConfig, _name)] = (lambda v: v >= 1, "an integer >= 1")
_CHECKS[(GenerationConfig, "min_new_tokens")] = (lambda v: v >= 0, "an integer >= 0")
_CHECKS[(GenerationConfig, "truncate_min_length")] = (lambda v: v >= 0, "an integer >= 0")
_CHECKS[(GenerationConfig, "temperature")] = (lambda v: v > 0, _POSITIVE)
_CHECKS[(GenerationConfig, "top_k")] = (lambda v: v >= 0, "an integer >= 0 (0 = off)")
_CHECKS[(GenerationConfig, "top_p")] = (lambda v: 0 < v <= 1, "a number in (0, 1]")
_CHECKS[(RewardConfig, "batch_size")] = (lambda v: v >= 1, "an integer >= 1")
for _name in ("iterations", "rollout_batch_size", "samples_per_prompt", "eval_prompts"):
    _CHECKS[(PPOConfig, _name)] = (lambda v: v >= 1, "an integer >= 1")
_CHECKS[(PPOConfig, "stop_after_iterations")] = (lambda v: v is None or v >= 1, "an integer >= 1 or null")


def _cross_checks(cfg, path: str) -> None:
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
    if isinstance(cfg, RewardConfig) and cfg.model_path is not None and cfg.function is not None:
        raise ValueError(f"{path}: give reward.model_path or reward.function, not both")
    if isinstance(cfg, (SFTConfig, RMConfig)) and cfg.batch_size % cfg.micro_batch_size:
        raise ValueError(
            f"{path}.batch_size ({cfg.batch_size}) must be a multiple of {path}.micro_batch_size ({cfg.micro_batch_size})"
        )


# ---- typed values ------------------------------------------------------------------------------


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
            list: "a list of strings"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _coerce(value, tp, path: str):
    """``value`` (from YAML or a command line) as type ``tp``; ValueError naming ``path`` otherwise."""

    def bad():
        return ValueError(f"{path}: expected {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin is typing.Union:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ValueError(f"{path}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(tp)):
            raise bad()
        return tuple(_coerce(v, t, path) for v, t in zip(value, typing.get_args(tp)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        try:  # PyYAML reads "3e-6" (no dot) as a string: accept any float literal
            out = float(value)
        except (TypeError, ValueError):
            raise bad() from None
        if not math.isfinite(out):
            raise bad()
        return out
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    if tp is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if not value.strip().startswith("[") else yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{path}: expected a list of strings, got {value!r}")
        return list(value)
    if tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    raise TypeError(f"{path}: unsupported field type {tp!r}")


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _check_value(cls, name: str, value, path: str) -> None:
    check = _CHECKS.get((cls, name))
    if check is not None and not check[0](value):
        raise ValueError(f"{path}: expected {check[1]}, got {value!r}")


def from_dict(cls, data: Optional[dict], path: str = ""):
    """A ``cls`` instance from a nested dict (YAML), every value type-checked; unknown keys and
    bad values are ValueErrors naming the dotted path."""
    obj = cls()
    if data:
        update(obj, data, path)
    validate(obj, path)
    return obj


def update(obj, data: dict, path: str = "") -> None:
    """Applies a nested dict of values to a config object in place; each value is type- and
    range-checked; constraints between fields are left to ``validate`` (call it once all values
    are in, so that e.g. batch_size and micro_batch_size can change together)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping of fields, got {data!r}")
    cls = type(obj)
    hints = _hints(cls)
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise ValueError(f"unknown field {sub!r}; {type(obj).__name__} has: {', '.join(hints)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            update(getattr(obj, key), value, sub)
        else:
            setattr(obj, key, _coerce(value, tp, sub))
            _check_value(cls, key, getattr(obj, key), sub)


def validate(obj, path: str = "") -> None:
    """Checks every field's range and the constraints between fields (recursively)."""
    for f in dataclasses.fields(obj):
        sub = f"{path}.{f.name}" if path else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, sub)
        else:
            _check_value(type(obj), f.name, value, sub)
    _cross_checks(obj, path or type(obj).__name__)


def to_dict(obj) -> dict:
    """Nested plain dict (tuples as lists), ready for YAML / JSON."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}


# ---- dotted paths and overrides ------------------------------------------------------------------


def _leaf_paths(cls, prefix: str = "") -> list[str]:
    out = []
    for name, tp in _hints(cls).items():
        p = f"{prefix}.{name}" if prefix else name
        out.extend(_leaf_paths(tp, p) if dataclasses.is_dataclass(tp) else [p])
    return out


def resolve_path(root_cls, dotted: str) -> str:
    """The full dotted path of a field. Exact paths pass through; ``rm.lr`` becomes ``rm.optim.lr``
    when exactly one field named ``lr`` lives under ``rm``. ValueError (with close matches) otherwise."""
    leaves = _leaf_paths(root_cls)
    if dotted in leaves:
        return dotted
    head, _, leaf = dotted.rpartition(".")
    candidates = [p for p in leaves if p.startswith(f"{head}.") and p.rsplit(".", 1)[-1] == leaf] if head else []
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        raise ValueError(f"ambiguous field {dotted!r}: could be {', '.join(candidates)}")
    near = [p for p in leaves if p.rsplit(".", 1)[-1] == leaf]
    if near:
        raise ValueError(f"unknown field {dotted!r}; did you mean {', '.join(near)}?")
    cls, known = root_cls, []
    for part in dotted.split(".")[:-1]:  # the deepest section that exists, to list its fields
        tp = _hints(cls).get(part)
        if not dataclasses.is_dataclass(tp):
            break
        cls, known = tp, known + [part]
    where = ".".join(known) or "the top level"
    raise ValueError(f"unknown field {dotted!r}; {where} has: {', '.join(_hints(cls))}")


def set_path(obj, dotted: str, value) -> None:
    """Sets one (possibly shortened) dotted field from a YAML-ish value or string (type- and
    range-checked; call ``validate`` after the last one)."""
    full = resolve_path(type(obj), dotted)
    nested: dict = {}
    cursor = nested
    parts = full.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = _parse_scalar(value)
    update(obj, nested)


def _parse_scalar(value):
    if isinstance(value, str):
        try:
            return yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            return value
    return value


def parse_overrides(argv: list[str], *, default_section: Optional[str] = None, root_cls=None) -> list[tuple[str, str]]:
    """``["--rm.lr", "3e-6", "--sft.deepspeed.zero_stage=2"]`` -> ``[("rm.lr", "3e-6"), ...]``.
    A path that does not start with a section of ``root_cls`` gets ``default_section.`` in front
    (so ``rlhf-fast sft --lr 1e-4`` works)."""
    root_cls = root_cls or RunConfig
    sections = set(_hints(root_cls))
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected an override like --rm.lr 3e-6, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"override --{key} has no value")
            value, i = argv[i + 1], i + 1
        if default_section and key.split(".", 1)[0] not in sections:
            key = f"{default_section}.{key}"
        out.append((key, value))
        i += 1
    return out


# ---- presets, files, the one entry point -----------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "ci": {
        # The built-in task on 2 CPU cores: SFT a narrow 2-layer model for ~40 s, then an RM from it
        # that passes 0.75 held-out accuracy (tests/test_sft_rm.py times it).
        "sft.model.config_overrides": {"n_embd": 128, "n_layer": 2, "n_inner": 384},
        "sft.epochs": 1.0, "sft.max_steps": 100, "sft.batch_size": 64, "sft.micro_batch_size": 64,
        "sft.optim.lr": 2e-3, "sft.data.max_train_examples": 6400, "sft.data.max_eval_examples": 256,
        "rm.max_steps": 120, "rm.batch_size": 64, "rm.micro_batch_size": 64, "rm.optim.lr": 5e-4,
        "rm.scheduler.warmup_steps": 5, "rm.data.max_eval_examples": 512, "rm.normalization_samples": 128,
        "sft.logging.log_every": 10, "rm.logging.log_every": 10,
    },
    "n_details": {
        # "The N Implementation Details of RLHF with PPO": RM 1 epoch, lr annealed linearly to 0
        # (#5), TF-style Adam epsilon, normalisation on samples of the initial policy (#9).
        "rm.epochs": 1.0, "rm.scheduler.decay": "linear", "rm.scheduler.min_lr_ratio": 0.0,
        "rm.optim.tf_adam_eps": True, "rm.normalization": "policy_samples", "rm.sample_temperature": 1.0,
        "sft.optim.tf_adam_eps": True,
    },
    "n_plus": {
        # "The N+ Implementation Details ... TL;DR": one lr 3e-6, AdamW eps 1e-5, SFT 1 epoch on
        # query + summary with a cosine schedule, ZeRO-2, RM from SFT with reference-mean normalisation.
        "sft.optim.lr": 3e-6, "rm.optim.lr": 3e-6, "sft.optim.eps": 1e-5, "rm.optim.eps": 1e-5,
        "sft.epochs": 1.0, "sft.loss_on": "all", "sft.scheduler.decay": "cosine", "rm.epochs": 1.0,
        "sft.deepspeed.zero_stage": 2, "rm.deepspeed.zero_stage": 2, "rm.normalization": "reference_mean",
    },
}


def _ppo_preset(name: str, **extra) -> dict[str, Any]:
    """A PPO paper preset: every ``algo`` field of ``rlhf_fast.algos.PRESETS[name]`` plus the
    generation / model settings the paper pairs with it."""
    algo = {f"ppo.algo.{k}": v for k, v in dataclasses.asdict(PPO_PRESETS[name]).items()}
    return {**algo, **extra}


PRESETS.update({
    # "The N Implementation Details of RLHF with PPO" (lm-human-preferences): fixed-length
    # responses with EOS ignored (#4), truncation at the first '.' at or after token 16 and a
    # -1 score without one (#14), temperature 0.7 in sampling and log-probs (#10), a zero-init
    # value head on the policy (#11), adaptive KL (#20), TF-style Adam eps.
    "lm_human_preferences": _ppo_preset(
        "lm_human_preferences", **{
            "ppo.generation.stop_at_eos": False, "ppo.generation.stop_tokens": ["."],
            "ppo.generation.stop_during_generation": False, "ppo.generation.truncate_min_length": 16,
            "ppo.generation.missing_stop_penalty": "replace", "ppo.generation.missing_stop_value": -1.0,
            "ppo.generation.temperature": 0.7, "ppo.generation.top_k": 0, "ppo.generation.top_p": 1.0,
            "ppo.critic": "value_head", "ppo.optim.tf_adam_eps": True, "ppo.scheduler.decay": "linear",
        }),
    # "The N+ Implementation Details ... TL;DR": EOS trick with -1 for a missing EOS, beta 0.05,
    # temperature 0.7, critic from the reward model, ZeRO-2, lr 3e-6 / eps 1e-5.
    "tldr": _ppo_preset(
        "tldr", **{
            "ppo.generation.stop_at_eos": True, "ppo.generation.missing_stop_penalty": "replace",
            "ppo.generation.missing_stop_value": -1.0, "ppo.generation.temperature": 0.7, "ppo.critic": "separate",
        }),
    # "Secrets of RLHF, Part I" PPO-max: score clipping, small fixed beta, value clipping, critic
    # from the reward model, samples at 0.8 / top-p 0.9 but log-probs from raw logits.
    "ppo_max": _ppo_preset(
        "ppo_max", **{
            "ppo.generation.temperature": 0.8, "ppo.generation.top_p": 0.9, "ppo.generation.missing_stop_penalty": None,
            "ppo.critic": "separate",
        }),
})
PRESETS["ci"].update({
    # PPO on the built-in task inside the CI budget (the pipeline test): a few dozen iterations.
    "ppo.iterations": 30, "ppo.rollout_batch_size": 32, "ppo.eval_prompts": 64, "ppo.logging.eval_every": 10,
    "ppo.algo.num_epochs": 2, "ppo.algo.num_minibatches": 2, "ppo.optim.lr": 5e-4, "ppo.critic_optim.lr": 5e-4,
    "ppo.generation.max_new_tokens": 20,
})


def apply_preset(cfg: RunConfig, name: str) -> None:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
    for key, value in PRESETS[name].items():
        set_path(cfg, key, value)


def load_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def load_config(
    path: Optional[os.PathLike | str] = None,
    *,
    presets: typing.Sequence[str] = (),
    overrides: typing.Sequence[str] | typing.Sequence[tuple[str, Any]] = (),
    default_section: Optional[str] = None,
) -> RunConfig:
    """Defaults <- YAML file <- presets (in order) <- overrides (in order). A YAML file may name
    its own presets in a top-level ``presets:`` list (applied before its other keys... and before
    the presets given here)."""
    cfg = RunConfig()
    data = load_yaml(path) if path is not None else {}
    for name in data.pop("presets", None) or []:
        apply_preset(cfg, name)
    update(cfg, data)
    for name in presets:
        apply_preset(cfg, name)
    pairs = overrides
    if overrides and isinstance(overrides[0], str):
        pairs = parse_overrides(list(overrides), default_section=default_section)
    for key, value in pairs:
        set_path(cfg, key, value)
    validate(cfg)
    return cfg


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---- derived values ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """The batch geometry of one stage for one world size, computed once.

    batch_size: global sequences (pairs) per optimizer step. micro_batch_size: per forward on one
    rank. grad_accum: micro-batches per optimizer step per rank. world_size: data-parallel ranks.
    """

    batch_size: int
    micro_batch_size: int
    grad_accum: int
    world_size: int

    @classmethod
    def resolve(cls, stage, world_size: int, path: str = "") -> "BatchPlan":
        """From a stage config (``batch_size``, ``micro_batch_size``, ``deepspeed.grad_accum``)."""
        per_step = stage.micro_batch_size * world_size
        accum = stage.deepspeed.grad_accum
        if accum is None:
            if stage.batch_size % per_step:
                raise ValueError(
                    f"{path}batch_size ({stage.batch_size}) must be a multiple of micro_batch_size x world size "
                    f"({stage.micro_batch_size} x {world_size} = {per_step})"
                )
            accum = stage.batch_size // per_step
        elif accum * per_step != stage.batch_size:
            raise ValueError(
                f"{path}deepspeed.grad_accum ({accum}) x micro_batch_size ({stage.micro_batch_size}) x world size "
                f"({world_size}) = {accum * per_step}, but batch_size is {stage.batch_size}"
            )
        return cls(stage.batch_size, stage.micro_batch_size, accum, world_size)


# ---- field documentation (for --help) ----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a config dataclass (read from its source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe(cls=RunConfig) -> list[tuple[str, Any, str]]:
    """(dotted path, default, doc) for every leaf field."""
    return list(_describe_obj(cls(), ""))


def _describe_obj(obj, prefix: str):
    for f in dataclasses.fields(obj):
        p = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _describe_obj(value, p)
        else:
            yield p, value, field_docs(type(obj)).get(f.name, "")
