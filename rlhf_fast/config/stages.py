"""The stage configs: sft, rm, ppo and its generation / reward sections, and ``RunConfig`` that holds
them. Their value constraints beyond the types: ``config/constraints.py``; the named presets:
``config/presets.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from rlhf_fast.algos.hparams import PRESETS as PPO_PRESETS
from rlhf_fast.algos.hparams import PPOHyperParams
from rlhf_fast.config.sections import (
    DataConfig, DeepSpeedConfig, LoggingConfig, LoRAConfig, ModelConfig, OptimConfig, PPOLoggingConfig, SchedulerConfig,
)


@dataclass
class SFTConfig:
    """Supervised fine-tuning of the policy on prompt + reference response."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(decay="cosine", warmup_ratio=0.05))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Train LoRA adapters instead of every weight (rank 0: off); ``model/`` then holds the adapter."""
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
    packing: Optional[bool] = None
    """Run every model forward of this stage on packed sequences (``rlhf_fast/models/packing.py``:
    the valid tokens only, attention confined to each sequence; docs/architecture.md "Packed
    sequences"). None (default): packed when the model's attention implementation can pack (sdpa,
    eager, flash-attention), padded otherwise; true: packed or a ValueError naming this field;
    false: the padded [B, T] batches."""
    max_tokens_per_micro_batch: Optional[int] = None
    """Cut each rank's share of a global batch into micro-batches of at most this many tokens
    (a longer sequence goes alone) instead of ``micro_batch_size`` sequences, the same count on
    every rank (rlhf_fast/trainers/token_budget.py); the loss is still the global batch's sum over its
    unit count. None: by ``micro_batch_size``."""
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
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA on the reward model's backbone (rank 0: off); ``lora.train_head`` trains the score head fully."""
    sft_model: Optional[str] = None
    """SFT checkpoint (a directory written by ``rlhf-fast sft``) the RM is initialised from (N+: RM
    from the SFT model). None and no ``model.path``: ``rlhf-fast rm`` first runs the ``sft``
    section into ``DIR/sft`` and starts from that."""
    margin: float = 0.0
    """Loss -log sigmoid(r_chosen - r_rejected - margin); 0 is plain Bradley-Terry (Llama 2 adds a margin)."""
    normalization: str = "policy_samples"
    """After training: "policy_samples" sets gain and bias so responses sampled from the initial
    (SFT) policy score mean 0 / std 1 (N details #9); "reference_mean": bias = -mean score of the
    SFT data's reference responses (N+); "reference_std": mean 0 / std 1 on those; "none"."""
    normalize_before: bool = False
    """Also normalise BEFORE training ("N Implementation Details" #9; lm-human-preferences'
    ``normalize_before``, on in its reward-model launches). Needs ``normalization``
    "policy_samples". Before the first optimizer step, gain and bias are set so the initial
    policy's samples score mean 0 / std 1 under the untrained RM, and the Bradley-Terry loss (its
    ``margin`` included) and the train / eval reward metrics then use the normalised scores
    ``gain * raw + bias``. Gain and bias are fixed buffers, never trained: the bias cancels in
    r_chosen - r_rejected, the gain scales the logits and hence the gradients. The normalisation
    after training still runs, again from the raw scores. Done only by a run that starts at step
    0: a resumed run gets gain and bias back from its checkpoint. False: the loss sees raw scores."""
    normalization_samples: int = 512
    """Prompts (or reference responses) used to set the normalisation (before and after training).
    "policy_samples" draws fresh ones each time, as lm-human-preferences: before training from the
    first ``normalization_samples`` training prompts with seed ``seed``, after training from the
    next ones (wrapping around) with seed ``seed + 1``."""
    sample_temperature: Optional[float] = None
    """Sampling temperature of the "policy_samples" responses (top_k 0, top_p 1). None: the same
    config's ``ppo.generation.temperature`` (0.7 by default), so the RM is normalised on the
    distribution PPO samples from, as lm-human-preferences (its reference policy samples at the
    task's policy temperature: 0.7 on books and TL;DR, 0.5 on CNN/DM); 0.7 for an ``RMConfig``
    used on its own."""
    sample_max_new_tokens: int = 24
    """Response length of those samples."""
    sample_stop_at_eos: bool = True
    """Those samples end at their first EOS. False samples ``sample_max_new_tokens`` tokens with EOS
    an ordinary token and scores them untruncated, as openai/lm-human-preferences
    ``train_reward.py`` (``sample_policy_batch``: ``policy.respond_op(length=response_length)``,
    scored by ``get_rewards`` without the PPO postprocessing)."""
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
    packing: Optional[bool] = None
    """Run every model forward of this stage on packed sequences (``rlhf_fast/models/packing.py``:
    the valid tokens only, attention confined to each sequence; docs/architecture.md "Packed
    sequences"). None (default): packed when the model's attention implementation can pack (sdpa,
    eager, flash-attention), padded otherwise; true: packed or a ValueError naming this field;
    false: the padded [B, T] batches."""
    max_tokens_per_micro_batch: Optional[int] = None
    """Cut each rank's share of a global batch into micro-batches of at most this many tokens
    (chosen + rejected; a longer pair goes alone) instead of ``micro_batch_size`` pairs, the same count on
    every rank (rlhf_fast/trainers/token_budget.py); the loss is still the global batch's sum over its
    unit count. None: by ``micro_batch_size``."""
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
    """More token strings that end a response, e.g. ["."] ("N details" #14: truncate at '.'). Each
    entry is a vocabulary token, or a text that encodes to one token; where " " + text is also a
    single token (a byte-level BPE's "Ġ."), that id stops a response too: a period after a space is
    still a period."""
    stop_during_generation: bool = True
    """Also stop sampling a row at a stop token (saves compute); False samples the full length and
    truncates afterwards, as lm-human-preferences does (its ``respond`` always samples
    ``response_length`` tokens). Whether PPO then trains on the tokens after the stop is
    ``after_stop``."""
    truncate_min_length: int = 0
    """Only stop tokens at index >= this count ("N details" #14: '.' at or after token 16)."""
    missing_stop_penalty: Optional[str] = "replace"
    """Rows with no stop token: "replace" the score with ``missing_stop_value`` (lm-human-
    preferences, N+: -1), "subtract" it (TRL ``missing_eos_penalty``), or null (none)."""
    missing_stop_value: float = -1.0
    """The replacement score, or the amount subtracted."""
    after_stop: str = "masked"
    """Which sampled tokens PPO trains on after the first stop token, and where the score lands
    (``rlhf_fast.algos.postprocess_responses``). The reward always scores the response truncated
    after its stop token, and the missing-stop penalty always looks for one. "masked" (N+ TL;DR,
    vwxyzjn/summarize_from_feedback_details ``ppo.py``; TRL): tokens after the stop are padded
    and masked out of the KL penalty, GAE, whitening and the losses; the score lands on the stop
    token. "trained" (openai/lm-human-preferences ``train_policy.py``: ``make_score_fn``
    truncates only the copy it scores, ``compute_rewards`` adds the score at ``rewards[:, -1]``,
    ``loss`` runs over every sampled token): the KL penalty, GAE, whitening and the losses cover
    every sampled token and the score lands on the last sampled one. "trained" needs
    ``stop_during_generation`` and ``stop_at_eos`` false (rows sampled to full length)."""
    max_batch_size: int = 256
    """Rows decoded at once by the engine (a larger rollout is decoded in chunks)."""
    backend: str = "hybrid"
    """What generates the rollouts (``rlhf_fast.engine.backend_names()``; docs/architecture.md,
    "Generation backends"): "hybrid" (default) — this project's engine on the live training
    weights, whose log-probs are the trainer's own numbers; "hf_generate" — Hugging Face
    ``generate`` on a copy of the weights synced after every update (the shape of a separate
    inference engine such as vLLM): its log-probs are not the trainer's, so ``ppo.old_logprobs``
    must be "recompute" and the gap is logged as ``generation/logprob_gap_max``."""
    decode: str = "auto"
    """The engine's decode path (``rlhf_fast.engine.decode_modes()``: "auto" and every registered
    decoder, docs/architecture.md "Generation"): "compiled" (static cache, torch.compile'd step, CUDA graphs on
    a GPU), "eager" (filled-prefix attention, finished rows compacted away), "static" (the
    compiled path's step, not compiled), or "auto": compiled on CUDA unless ZeRO-3 partitions
    the policy or the architecture has no plain static cache, eager otherwise."""


@dataclass
class RewardConfig:
    """Where the scores come from."""

    model_path: Optional[str] = None
    """A reward-model directory written by ``rlhf-fast rm`` (normalisation included), or a Hugging
    Face ``AutoModelForSequenceClassification`` directory with num_labels 1 (TRL / OpenRLHF reward
    models: its trained score head, read as transformers reads it). It must share the policy's
    tokenizer; a directory without a trained reward head is an error. The pipeline fills it in."""
    function: Optional[str] = None
    """Instead of a model: ``package.module:function`` taking (prompts, responses) lists and
    returning one finite number per prompt; ``task:gold`` uses the built-in task's gold reward."""
    batch_size: int = 64
    """Sequences per reward-model forward."""


@dataclass
class AsyncRolloutConfig:
    """Asynchronous rollouts (``ppo.rollout``; docs/architecture.md, "Asynchronous rollouts"): rollout
    worker processes generate and score the next batches on a weight snapshot while the trainer
    updates (verl's fully-async mode, AReaL, NeMo-RL's one-step off-policy mode overlap the two)."""

    max_staleness: int = 0
    """K: a batch is trained on only if the weights that sampled it are at most K updates old. 0 (the
    default) is the synchronous loop: iteration i samples from the weights after i updates. With K >= 1
    iteration i samples from the weights after max(start, i - K) updates (exactly: a worker waits for
    that version and takes no newer one, so a run is a function of its seed), and the update is the
    decoupled PPO objective (``correction``). Needs a rollout worker (``workers`` None or >= 1)."""
    workers: Optional[int] = None
    """Rollout worker processes (each a forked copy of the policy and the scorer with its own hybrid
    engine; iteration i goes to worker i mod N). None (default): 1 when ``max_staleness`` >= 1, else 0;
    0: the trainer generates itself. With ``max_staleness`` 0 and workers the run is bit-identical to
    the synchronous one (the worker waits for the current weights); it only moves generation to
    another process."""
    correction: str = "decoupled"
    """The off-policy correction for K >= 1 (``rlhf_fast/algos/off_policy.py``: ``OFF_POLICY_CORRECTIONS``):
    "decoupled" — the decoupled PPO objective, the ratio clipped against the proximal policy (the
    trainer's weights at the start of the update) and each token weighted by pi_prox / pi_behav
    (Hilton et al. 2022, "Batch size-invariance for policy optimization"; AReaL, Fu et al. 2025);
    "truncated_is" — the same weight capped at ``importance_weight_cap`` (IMPALA's truncation; TIS,
    Yao et al. 2025)."""
    importance_weight_cap: float = 2.0
    """C of "truncated_is": w = min(pi_prox / pi_behav, C). 2 as TIS's and verl's ``tis_imp_ratio_cap``."""
    bucket_mb: float = 32.0
    """Weight sync: the trainable parameters (with LoRA: the adapters) travel in flat buckets of at
    most this many MiB, one ``torch.distributed`` broadcast each (gloo on CPU; DeepSpeed / PyTorch DDP
    bucket gradients at 25-500 MB for the same reason: fewer, larger messages)."""

    @property
    def worker_count(self) -> int:
        """The rollout worker processes this config starts (``workers`` with None resolved)."""
        if self.workers is not None:
            return self.workers
        return 1 if self.max_staleness else 0


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
    critic_lr_ratio: Optional[float] = None
    """The critic's peak lr as a multiple of ``optim.lr`` (``critic_optim.lr`` is then unused): the
    ratio is part of a method whatever lr a run picks. MOSS-RLHF ``train_ppo_en.sh``: 3 (critic_lr
    1.5e-6, lr 5e-7); N+ TL;DR: 1 (one AdamW over policy and critic, ``ppo.py``). None: the
    critic's own ``critic_optim.lr``."""
    critic_head_bias: bool = True
    """Train the separate critic's value-head bias. False keeps it fixed at its initial value (the
    reward model's head bias, 0 for a fresh head), so the initial values still equal the reward
    model's per-token rewards: MOSS-RLHF's critic head is ``nn.Linear(hidden, 1, bias=False)``
    (``train_ppo.py: LlamaRewardModel``). N+ ``ScalarModel`` has a trainable bias."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Linear decay to 0 ("N details" #5), over the unit of ``lr_schedule_unit``."""
    lr_schedule_unit: str = "optimizer_step"
    """What the lr schedule counts. "optimizer_step": the lr changes at every optimizer step
    (``iterations * num_epochs * num_minibatches`` steps; DeepSpeed-Chat, OpenRLHF, MOSS-RLHF). "iteration":
    the lr is constant across one PPO iteration's epochs and minibatches and is annealed between
    iterations, over ``iterations`` (warm-up steps then count iterations): lr at iteration k =
    lr * lr_factor(k), as openai/lm-human-preferences ``train_policy.py`` (``train_minibatch``:
    ``lrnow = lr * (1 - policy_frac)``, the global step advancing once per ``PPOTrainer.step``)
    and the N+ TL;DR code (summarize_from_feedback_details ``ppo.py``: ``frac = 1 - (update - 1)
    / num_updates`` set once per update)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """``grad_clip`` is taken from ``algo.max_grad_norm``; ``grad_accum`` from the minibatch plan."""
    logging: PPOLoggingConfig = field(default_factory=PPOLoggingConfig)
    """Counted in iterations; ``samples_per_iteration`` rollouts per iteration go to ``DIR/samples.jsonl``."""
    critic: str = "separate"
    """"separate": a critic initialised from the reward model (N+ TL;DR, PPO-max); "value_head": a
    zero-initialised value head on the policy backbone ("N details" #11)
    (``rlhf_fast/models/layouts.py``: ``CRITIC_LAYOUTS``)."""
    policy_wrapper: str = "policy"
    """What wraps the policy's causal LM (``rlhf_fast/models/wrappers.py``: ``POLICY_WRAPPERS``):
    "policy", ``rlhf_fast.models.Policy`` (log-probs and entropy with the fused ops, an optional
    value head). The frozen reference of full fine-tuning is the same wrapper around a copy."""
    critic_with_rm_normalization: bool = False
    """A separate critic initialised from the reward model gets the reward model's normalisation
    folded into its value head (initial values = normalised per-token rewards), as N+ TL;DR's
    critic (summarize_from_feedback_details ``ScalarModel``: head minus the reward model's
    reference-mean bias). False: the raw reward head (MOSS-RLHF's critic, the default)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA on the policy (rank 0: off). With adapters the reference policy is the policy itself with
    its adapters disabled (peft's ``disable_adapter``): no copy of the weights exists, so
    ``ref_on_cpu`` has nothing to move and ``frozen_zero3`` shards the reward model only.
    ``lora.train_head``: the value head (``critic`` "value_head") is trained fully."""
    critic_lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA on the separate critic's backbone (rank 0: off); ``train_head`` trains its value head fully."""
    ref_on_cpu: bool = False
    """Keep the frozen reference policy on the CPU (N+ offloads reference and reward models at 6.9B).
    Refused with ``lora.rank`` > 0: there is no reference copy to move."""
    frozen_zero3: Optional[bool] = None
    """Shard the frozen reference policy and reward model with DeepSpeed ZeRO-3 inference, so each
    rank holds 1/world of their weights (DeepSpeed-Chat and OpenRLHF do this when the actor is
    ZeRO-3). None: on when ``deepspeed.zero_stage`` is 3 and ``ref_on_cpu`` is off. With
    ``lora.rank`` > 0 only the reward model is sharded: the reference is the policy's own weights."""
    use_linear_logprobs: Literal["auto", True, False] = "auto"
    """How the policy's and the reference's log-probs are taken from the hidden states. true:
    always ``ops.linear_logprobs`` (the LM-head matmul fused, logits never stored whole; works
    under ZeRO-3); false: the logits of the whole micro-batch, (micro_batch, R, V), are formed and
    kept for the backward (1.2 GB per 2,048-token sequence at V = 151,936 in float32); "auto"
    (default): per LM-head call, when those logits (rows x V x element size) would exceed
    ``logits_budget_mb``, the stored path in row chunks that fit it, each under activation
    checkpointing (its logits formed in its forward and again in its backward), else the whole call
    stored (docs/architecture.md "Log-probs from hidden states"). The choice depends on the rows'
    count only: a micro-batch's old, new and reference log-probs are taken the same way, and the
    first minibatch's ratio stays exactly 1. Issue 35: real shapes never store tokens x V logits,
    small ones keep the stored path's numbers, and bf16 keeps bf16 GEMMs (the fused op computes in
    float32: 3-12x the stored path's time in bf16 on a CPU)."""
    logits_budget_mb: float = 256.0
    """The logits budget of ``use_linear_logprobs: auto``, in MB (2**20 bytes): the most logits one
    chunk forms. 256 (441 tokens at V = 151,936 in float32, 883 in bf16): no larger than the head's
    own (V, H) weight gradient at Qwen2-0.5B's shape, so the logits at most double the head's memory."""
    packing: Optional[bool] = None
    """Run every model forward of this stage on packed sequences (``rlhf_fast/models/packing.py``:
    the valid tokens only, attention confined to each sequence; docs/architecture.md "Packed
    sequences"). None (default): packed when the model's attention implementation can pack (sdpa,
    eager, flash-attention), padded otherwise; true: packed or a ValueError naming this field;
    false: the padded [B, T] batches."""
    rollout: AsyncRolloutConfig = field(default_factory=AsyncRolloutConfig)
    """Asynchronous rollouts: worker processes and bounded staleness (off by default: synchronous)."""
    old_logprobs: str = "recompute"
    """Where the PPO ratio's old log-probs come from: "recompute" — a policy forward over the
    rollout in the first epoch's micro-batches (the first minibatch's ratio is then exactly 1; the
    N-details code, TRL before 0.12, OpenRLHF, verl); "rollout" — the engine's own per-token
    log-probs of the sampled tokens (live weights, same model code: equal up to float32 rounding),
    and the policy's log-prob forward is skipped (TRL's PPOTrainer does this). Needs
    ``algo.temperature`` = ``generation.temperature`` and the sampler's filter."""
    logprob_gap_every: int = 10
    """With ``old_logprobs: rollout``, recompute the old log-probs every this many iterations to log
    ``generation/logprob_gap_max`` (engine vs trainer); with "recompute" the gap is free and logged
    every iteration."""
    env: Optional[str] = None
    """Multi-turn episodes against an environment (docs/architecture.md, "Multi-turn episodes"): a
    registered name (``rlhf_fast.envs.ENVIRONMENTS``: "tiny_calculator") or ``package.module:Class``
    (a callable returning a fresh ``envs.Environment`` per episode). The model's turn ends at a
    ``generation.stop_tokens`` token or EOS, the environment's answer is appended as tokens (attended,
    never trained on), and the episode's score is the environment's last reward (earlier turns'
    rewards land on their turn's last token); ``generation.max_new_tokens`` is the episode's token
    budget. No reward model or function is used: ``reward`` must be empty. None: single-turn rollouts."""
    env_max_turns: int = 8
    """Model turns per episode at most (with ``env``); the episode ends after the turn that reaches it."""
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
