"""The shared config sections: model, data, optimizer, schedule, DeepSpeed, logging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


# ---- the sections ------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """Which model a stage starts from."""

    path: Optional[str] = None
    """Local directory of a Hugging Face causal LM (or one saved by rlhf_fast), with its tokenizer
    (or ``tokenizer_path``). None: a fresh model of ``arch`` / ``size`` sized to the built-in task's
    tokenizer (nothing is ever downloaded)."""
    tokenizer_path: Optional[str] = None
    """Local tokenizer directory. None: the one saved in ``path`` (a ``path`` without a tokenizer is
    an error: the built-in tokenizer's ids would be wrong for it); the built-in task's for a fresh
    model (no ``path``)."""
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
    """Record field with the prompt (query): a string, or a list of ``{role, content}`` messages
    rendered with the tokenizer's chat template (``rlhf_fast.data.chat``)."""
    messages_field: str = "messages"
    """Record field with a whole chat conversation (TRL's conversational format), read when the
    record has no prompt / response fields: SFT trains on its last (assistant) message as the
    response; PPO prompts are its messages (no assistant message last)."""
    response_field: str = "response"
    """SFT: record field with the reference response (a string, or a message list when the prompt is one)."""
    chosen_field: str = "chosen"
    """RM: record field with the preferred response (a string, or a message list: TRL's preference
    format, the prompt then a message list or the messages chosen and rejected share)."""
    rejected_field: str = "rejected"
    """RM: record field with the other response (the same form as ``chosen_field``)."""
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
    """Decoupled (AdamW) weight decay on every trained parameter. 0 by default, as
    lm-human-preferences (TF Adam, no decay: presets ``lm_human_preferences``, ``n_details``) and
    MOSS-RLHF (``build_optimizer``: 0 in every group; ``ppo_max``). 0.01 in the N+ TL;DR code's SFT,
    RM and PPO (summarize_from_feedback_details builds ``optim.AdamW(params, lr, eps)``, so torch's
    default 0.01 applies; presets ``n_plus`` and ``tldr``)."""
    tf_adam_eps: bool = False
    """TF-style epsilon (N details, "PyTorch Adam vs TF Adam"): TF adds eps to sqrt(v) before bias
    correction, PyTorch after, so PyTorch's effective epsilon is eps * sqrt(1 - beta2^t) and early
    updates are larger. When on, the scheduler sets each step's eps to eps / sqrt(1 - beta2^t),
    which makes PyTorch's (and DeepSpeed's CPU / fused) Adam compute TF's update exactly."""
    fused: Literal["auto", True, False] = "auto"
    """torch's fused AdamW step. "auto": fused where CUDA is present, torch's per-tensor loop on a CPU
    (the numbers every run and pinned test has had); true: fused on the CPU too, 11x faster per step
    over 78 M parameters on one Zen 5 thread (0.46 s vs 0.043 s; TRL's default, benchmarks/PEERS.md)
    and the same update to float32 rounding, not to the bit. Ignored with ZeRO offload (DeepSpeed's
    CPU Adam)."""


def fused_adamw(fused, cuda_available: bool) -> bool:
    """Whether ``OptimConfig.fused`` takes torch's fused AdamW: "auto" where CUDA is present, else as set."""
    return cuda_available if fused == "auto" else bool(fused)


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: linear warm-up from 0, then decay to ``min_lr_ratio * lr``."""

    warmup_steps: int = 0
    """Optimizer steps of linear warm-up; ``warmup_ratio`` is used when this is 0."""
    warmup_ratio: float = 0.0
    """Warm-up as a share of the total optimizer steps (used when ``warmup_steps`` is 0)."""
    decay: str = "linear"
    """Shape after warm-up. "linear" to 0: N details #5 (lr annealed to 0 for RM training and PPO);
    "cosine": N+ SFT; "invsqrt": OpenLMLab/MOSS-RLHF's PPO schedule (``ppo_trainer.invsqrt_scheduler``:
    its own warm-up ``max(step / warmup, 0.1)``, then ``sqrt(warmup / step)``; ``min_lr_ratio`` unused)."""
    min_lr_ratio: float = 0.0
    """Final lr as a share of the peak; 0 = decay to 0 (N #5)."""


@dataclass
class DeepSpeedConfig:
    """How the DeepSpeed engine is built (``rlhf_fast.trainers.deepspeed_setup``)."""

    zero_stage: int = 0
    """ZeRO stage 0-3: 0 plain data parallel; 1 shards optimizer state; 2 also gradients (N+ runs
    ZeRO-2); 3 also parameters."""
    dtype: str = "fp32"
    """Training precision. bf16 on Ampere+ GPUs, and on CPUs with native bf16 matmuls (AVX-512 BF16 /
    AMX: ~2x fp32 per PPO iteration); elsewhere on the CPU fp32 (bf16 then warns: tens of times
    slower). fp16 uses dynamic loss scaling."""
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
    timeout_s: Optional[float] = None
    """Seconds a collective waits for the other ranks before it fails (``torch.distributed``'s
    process-group timeout): bounds how long the live ranks wait for a rank that died or hangs,
    before they stop with an error naming it and the last completed step (docs/architecture.md,
    "Faults"). None: DeepSpeed's default, 30 minutes. The first stage of a process sets it (the
    process group is made once per process)."""


@dataclass
class LoggingConfig:
    """Progress bar, metrics, TensorBoard and checkpoints."""

    log_every: int = 10
    """Optimizer steps between lines of ``DIR/metrics.jsonl`` (the last step is always logged)."""
    eval_every: int = 0
    """Optimizer steps between evaluations; 0: only at the end."""
    save_every: Optional[int] = None
    """Optimizer steps between checkpoints (the last step is always saved); 0: only at the end. None
    (the default): a tenth of the run, rounded up (every 20 steps of a 200-step run), so a job killed
    anywhere loses at most a tenth of its steps, while a run pays about ten saves whatever its length
    and ``keep_checkpoints`` bounds the disk used. A fixed count cannot do both: Hugging Face
    Trainer's 500 steps leaves every shorter run unprotected (nothing saved at step 67 of 400), and
    a small one makes long runs of large models spend their time saving."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept under ``DIR/checkpoints`` (older ones are deleted); 0 keeps all."""
    preempt_grace_s: Optional[float] = 20.0
    """Seconds a run waits, after SIGTERM or SIGUSR1 (a scheduler's notice), for the current step
    (PPO: iteration) to finish before it stops at once without a new checkpoint (the previous one
    stands); a step that finishes in time is checkpointed and the command exits with 75
    (README, "Preemption"). 20 s leaves a save and a clean exit inside the 30 s that SLURM
    (``KillWait``) and Kubernetes (``terminationGracePeriodSeconds``) wait by default before
    SIGKILL; raise it to the warning you ask for (``--signal=USR1@90``: ~60). 0 stops at once;
    null waits for the step however long it takes."""
    tensorboard: bool = True
    """Write TensorBoard events to ``DIR/tensorboard``."""
    progress_bar: bool = True
    """tqdm bar with loss and throughput on rank 0 (also off when stderr is not a terminal and
    ``RLHF_FAST_NO_TQDM`` is set)."""


@dataclass
class PPOLoggingConfig(LoggingConfig):
    """PPO's logging: counted in iterations (a rollout and its update) instead of optimizer steps,
    plus sample completions."""

    log_every: int = 1
    """Unused by PPO, kept for configs shared with the other stages: PPO writes a line to
    ``DIR/metrics.jsonl`` every iteration (an iteration is a whole rollout and its update)."""
    eval_every: int = 5
    """Iterations between evaluations on the held-out prompts (also before the first and after the
    last); 0: only those two."""
    save_every: Optional[int] = None
    """Iterations between checkpoints (the last iteration is always saved); 0: only at the end.
    None (the default): a tenth of ``iterations``, rounded up (4 of the default 40), for the reason
    given for the other stages (a killed job loses at most a tenth of its work; about ten saves per
    run). PPO checkpoints are per iteration, never inside one: an iteration's rollout and update are
    one unit, and its RNG state is a function of (seed, rank, iteration)."""
    samples_per_iteration: int = 4
    """Rollouts (prompt, response, score) of each iteration written to ``DIR/samples.jsonl`` and as
    a TensorBoard text table ("samples"): the first rows of rank 0's batch; 0 writes none. What the
    scores mean shows there first (a response cut by the missing-stop penalty, a reward hack)."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) through ``peft`` on a stage's model
    (``rlhf_fast.models.lora``; docs/architecture.md "LoRA"). The base weights stay frozen; only
    the adapters (and the scalar head, with ``train_head``) are trained and saved."""

    rank: int = 0
    """Adapter rank r; 0 = off (full fine-tuning), the default. 8-64 is the usual range (peft and
    TRL examples use 8-16)."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / rank) * B A. 16 as in the QLoRA / TRL examples
    (alpha = 2 r at r 8); peft's own default is 8."""
    dropout: float = 0.0
    """Dropout on the adapter input. 0 as every other dropout here ("N details" #13: with dropout
    the PPO ratio of the first minibatch is not 1); PPO refuses any other value."""
    target_modules: list = field(default_factory=list)
    """Module names (the last part of the module path) that get adapters. Empty: every linear layer
    of the architecture family (``rlhf_fast.models.lora.DEFAULT_TARGET_MODULES``: GPT-2 c_attn /
    c_proj / c_fc, Llama / Qwen2 / Mistral q / k / v / o / gate / up / down_proj, GPT-NeoX
    query_key_value / dense / dense_h_to_4h / dense_4h_to_h; peft's "all-linear" otherwise). A name
    the model lacks is an error listing the linear modules it has."""
    modules_to_save: list = field(default_factory=list)
    """Modules trained fully beside the adapters and saved with them (peft's ``modules_to_save``),
    e.g. ``[ln_f]`` or ``[embed_tokens, lm_head]`` after adding tokens. Empty (peft's default):
    none. A name the model lacks is an error listing its modules."""
    train_head: bool = True
    """Also train the scalar value / score head fully (it is small and new: the reward head is
    random, the value head zero). False freezes it (e.g. a critic whose head comes from the RM)."""
    save_merged: bool = False
    """Besides the adapter (peft format) and its base, also write ``model/merged``: the adapter
    merged into the base weights, a plain Hugging Face model loadable without peft."""
