"""``build_ppo_parts``: everything a PPO run is made of, built in one place and returned as one
frozen record (``PPOParts``; docs/architecture.md, "One PPO iteration"). The trainer
(``trainers/ppo.py``) only runs iterations over it; it names no model class, backend or layout.

The build order is fixed, because each step may draw from the seeded global generators:
seeds -> prompt records (checked before any model) -> tokenizer -> stop tokens -> policy (its
wrapper from ``ppo.policy_wrapper``), reward model or function, critic (``ppo.critic``'s layout),
reference (the policy with its adapters off under LoRA, else a frozen copy) -> packing -> prompt
datasets -> DeepSpeed engines (and ZeRO-3 inference engines for the frozen models) -> the
generator (``ppo.generation.backend``) -> scorer, prompt schedule, rollout stage.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from rlhf_fast.algos.hparams import PPOHyperParams
from rlhf_fast.config import BatchPlan, PPOConfig
from rlhf_fast.data import PromptDataset
from rlhf_fast.engine import Generator, make_generator
from rlhf_fast.envs import load_environment
from rlhf_fast.models import Critic, RewardModel, load_reward_model, lora
from rlhf_fast.models.layouts import CRITIC_LAYOUTS
from rlhf_fast.models.packing import set_packing
from rlhf_fast.models.precision import PRECISIONS
from rlhf_fast.models.wrappers import POLICY_WRAPPERS, PolicyWrapper
from rlhf_fast.trainers import _build
from rlhf_fast.trainers import deepspeed_setup as dss
from rlhf_fast.trainers.rollout import (
    PromptSchedule,
    RewardFn,
    RolloutStage,
    Scorer,
    load_reward_function,
    resolve_stop_tokens,
)


@dataclass(frozen=True)
class PPOParts:
    """The parts of one PPO run (``build_ppo_parts``).

    task: the built-in task (None with ``data.train_file``); tokenizer; stop_token_ids: the
    resolved ``generation.stop_tokens``; prompts / eval_prompts: ``PromptDataset``s; collate: their
    left-padding collator; max_prompt: the prompt width the generator is sized for.
    policy_engine / critic_engine (None without a separate critic): DeepSpeed engines;
    frozen_engines: ZeRO-3 inference engines of the frozen models (empty unless partitioned);
    ref_policy: the frozen reference (``logprobs(...)`` like the policy); reward_model: the frozen
    reward model, None when a reward function scores; generator: the rollout ``Generator``;
    rollouts: the ``RolloutStage`` (prompts -> responses -> scores).
    """

    task: Optional[Any]
    tokenizer: Any
    stop_token_ids: list
    prompts: PromptDataset
    eval_prompts: PromptDataset
    collate: Callable
    max_prompt: int
    policy_engine: Any
    critic_engine: Optional[Any]
    frozen_engines: list
    ref_policy: Any
    reward_model: Optional[RewardModel]
    generator: Generator
    rollouts: RolloutStage


class OnDevice:
    """A frozen policy kept on another device: inputs go there, log-probs come back."""

    def __init__(self, policy: PolicyWrapper, device):
        self.policy, self.device = policy, torch.device(device)

    def logprobs(self, input_ids, attention_mask, **kwargs):
        out = self.policy.logprobs(input_ids.to(self.device), attention_mask.to(self.device), **kwargs)
        return out.__class__(**{k: (v.to(input_ids.device) if isinstance(v, torch.Tensor) else v)
                                for k, v in vars(out).items()})


def build_ppo_parts(cfg: PPOConfig, hp: PPOHyperParams, *, plan: BatchPlan, dist: dss.DistInfo,
                    reward_fn: Optional[RewardFn] = None) -> PPOParts:
    """The parts of a PPO run for ``cfg`` (``hp``: its algorithm settings with the sampler's filter
    filled in; ``plan``: the update's micro-batch layout; ``dist``: this process; ``reward_fn``
    overrides ``cfg.reward``), in the order the module docstring gives."""
    dss.seed_everything(cfg.seed, dist.rank)
    task, train, evals = _prompt_records(cfg)
    tokenizer = _build.load_tokenizer(cfg.policy, cfg.data, source=cfg.policy.path, section="ppo.policy")
    stop_token_ids = resolve_stop_tokens(tokenizer, cfg.generation.stop_tokens)  # before any model
    policy, critic, ref_policy, reward_model, reward_fn = _models(cfg, hp, task, tokenizer, dist, reward_fn)
    ref = ref_policy.policy if isinstance(ref_policy, OnDevice) else ref_policy
    # ppo.packing on every model forward of the iteration (models/packing.py); the RL math sees the
    # padded (b, R) layout either way
    set_packing(cfg.packing, "ppo.packing", policy, critic, ref, reward_model)
    kw = dict(prompt_field=cfg.data.prompt_field, messages_field=cfg.data.messages_field,
              max_prompt_length=cfg.data.max_prompt_length)
    prompts, eval_prompts = PromptDataset(train, tokenizer, **kw), PromptDataset(evals, tokenizer, **kw)
    collate = prompts.collator(pad_to_length=cfg.data.max_prompt_length)
    policy_engine, critic_engine, frozen_engines = _engines(cfg, hp, plan, policy, critic, ref_policy, reward_model)
    max_prompt = cfg.data.max_prompt_length or max(int(x.numel()) for x in prompts.input_ids + eval_prompts.input_ids)
    generator = make_generator(policy_engine, pad_token_id=tokenizer.pad_token_id,
                               max_batch_size=cfg.generation.max_batch_size,
                               max_seq_len=max_prompt + cfg.generation.max_new_tokens,
                               decode=cfg.generation.decode, backend=cfg.generation.backend)
    env_factory = load_environment(cfg.env) if cfg.env is not None else None  # multi-turn: the env scores
    scorer = None if env_factory is not None else Scorer(
        reward_model=reward_model, reward_fn=reward_fn if reward_model is None else None, tokenizer=tokenizer,
        batch_size=cfg.reward.batch_size, trim_padding=hp.trim_padding)
    schedule = PromptSchedule(prompts, collate, seed=cfg.seed, global_prompts=cfg.rollout_batch_size,
                              samples_per_prompt=cfg.samples_per_prompt, rank=dist.rank, world_size=dist.world_size,
                              draws_per_iteration=hp.max_sampling_rounds if hp.dynamic_sampling else 1)
    rollouts = RolloutStage(cfg, generator=generator, schedule=schedule, scorer=scorer, tokenizer=tokenizer,
                            stop_token_ids=stop_token_ids, device=dist.device, rank=dist.rank, env_factory=env_factory)
    return PPOParts(task=task, tokenizer=tokenizer, stop_token_ids=stop_token_ids, prompts=prompts,
                    eval_prompts=eval_prompts, collate=collate, max_prompt=max_prompt, policy_engine=policy_engine,
                    critic_engine=critic_engine, frozen_engines=frozen_engines, ref_policy=ref_policy,
                    reward_model=reward_model, generator=generator, rollouts=rollouts)


def _prompt_records(cfg: PPOConfig) -> tuple[Optional[Any], list, list]:
    """(task, train, eval) prompt records, checked before any model is built."""
    task = _build.get_task(cfg.data) if cfg.data.train_file is None else None
    if cfg.data.train_file is not None:
        train = _build.file_records(cfg.data.train_file, "ppo.data.train_file")
        if cfg.data.eval_file:
            evals = _build.file_records(cfg.data.eval_file, "ppo.data.eval_file")
        else:  # hold out the last eval_prompts prompts
            train, evals = train[: -cfg.eval_prompts], train[-cfg.eval_prompts:]
    else:
        train, evals = task.prompt_records("train"), task.prompt_records("eval")
    if cfg.data.max_train_examples:
        train = train[: cfg.data.max_train_examples]
    evals = evals[: cfg.eval_prompts]
    if len(train) < cfg.rollout_batch_size:
        raise ValueError(f"{len(train)} training prompts < ppo.rollout_batch_size ({cfg.rollout_batch_size})"
                         + (f"; {len(evals)} others were held out for evaluation (ppo.eval_prompts "
                            f"{cfg.eval_prompts})" if evals and cfg.data.eval_file is None else ""))
    return task, train, evals


def _models(cfg: PPOConfig, hp: PPOHyperParams, task, tokenizer, dist: dss.DistInfo, reward_fn):
    """(policy, critic or None, frozen reference, frozen reward model or None, reward function or None)."""
    layout = CRITIC_LAYOUTS[cfg.critic]
    wrapper = POLICY_WRAPPERS[cfg.policy_wrapper]
    src = _build.model_source(cfg.policy, cfg.data, tokenizer)
    policy = wrapper.load(src, value_head=layout.value_head, seed=cfg.policy.init_seed,
                          attn_implementation=cfg.policy.attn_implementation, use_linear_logprobs=cfg.use_linear_logprobs,
                          logits_budget_mb=cfg.logits_budget_mb)
    if policy.config.vocab_size < len(tokenizer):
        raise ValueError(f"policy vocabulary {policy.config.vocab_size} < tokenizer size {len(tokenizer)}: "
                         "start PPO from an SFT checkpoint (rlhf-fast sft) made with this tokenizer")
    frozen_dtype = PRECISIONS[cfg.deepspeed.dtype].frozen_dtype
    if reward_fn is None and cfg.reward.function is not None:
        reward_fn = load_reward_function(cfg.reward.function, task=task)
    no_rm = reward_fn is not None or cfg.env is not None  # a function or the environment scores
    reward_model = None if no_rm else _reward_model(cfg, tokenizer, dist, frozen_dtype)
    critic = None
    if layout.separate and hp.estimator.needs_values:
        # N+ TL;DR / PPO-max: the critic starts from the reward model; else from the policy (zero head).
        critic = Critic.from_pretrained(cfg.reward.model_path, with_normalization=cfg.critic_with_rm_normalization) \
            if cfg.reward.model_path else Critic(copy.deepcopy(policy.backbone))
        if cfg.critic_lora.rank:
            lora.add_lora(critic.backbone, cfg.critic_lora, field="ppo.critic_lora")
            critic.value_head.requires_grad_(cfg.critic_lora.train_head)
        fix_critic_head_bias(critic, cfg)
    if cfg.lora.rank:
        # docs/architecture.md "LoRA": the reference is the policy with its adapters disabled; no copy
        lora.add_lora(policy.model, cfg.lora, field="ppo.lora")
        if policy.value_head is not None:
            policy.value_head.requires_grad_(cfg.lora.train_head)
        ref_policy = lora.AdaptersOff(policy)
    else:  # full fine-tuning: a frozen copy of the initial policy, in the training precision
        ref_policy = wrapper.wrap(copy.deepcopy(policy.model), use_linear_logprobs=cfg.use_linear_logprobs,
                                  logits_budget_mb=cfg.logits_budget_mb)
        ref_policy.eval().requires_grad_(False)
        if frozen_dtype is not None:
            ref_policy.to(frozen_dtype)
        # The frozen reference can live on the CPU (it only runs forwards): N+ offloads it for 6.9B.
        ref_policy = OnDevice(ref_policy.to("cpu"), "cpu") if cfg.ref_on_cpu else ref_policy.to(dist.device)
    critic = critic.to(dist.device) if critic is not None else None
    return policy.to(dist.device), critic, ref_policy, reward_model, reward_fn


def _reward_model(cfg: PPOConfig, tokenizer, dist: dss.DistInfo, frozen_dtype) -> RewardModel:
    """The frozen reward model of ``ppo.reward.model_path``."""
    if cfg.reward.model_path is None:
        raise ValueError("ppo.reward: give reward.model_path (a directory from rlhf-fast rm) or reward.function")
    if not Path(cfg.reward.model_path).is_dir():
        raise ValueError(f"ppo.reward.model_path {cfg.reward.model_path!r} is not a directory")
    rm = load_reward_model(cfg.reward.model_path, tokenizer)
    rm.to(dist.device)
    if frozen_dtype is not None:
        rm.backbone.to(frozen_dtype)
    return rm


def _engines(cfg: PPOConfig, hp: PPOHyperParams, plan: BatchPlan, policy, critic, ref_policy, reward_model):
    """(policy engine, critic engine or None, ZeRO-3 inference engines of the frozen models)."""
    build = dict(plan=plan, sched=cfg.scheduler, **dss.ppo_schedule(
        cfg.lr_schedule_unit, iterations=cfg.iterations, steps_per_iteration=hp.num_epochs * hp.num_minibatches))
    ds = copy.deepcopy(cfg.deepspeed)
    # joint_grad_clip: ppo_core.clip_jointly clips both models' gradients together, the engines none
    ds.grad_clip = 0.0 if (hp.joint_grad_clip and critic is not None) else (hp.max_grad_norm or 0.0)
    policy_engine = dss.build_engine(policy, optim=cfg.optim, ds=ds, **build)
    critic_engine = dss.build_engine(critic, optim=critic_optim(cfg), ds=ds, **build) if critic else None
    # ZeRO-3 inference for the frozen models: partitioned in place (the objects stay the same;
    # their hooks gather each module's weights for its forward). Every rank runs the same
    # forwards: the same micro-batch counts as the policy, which is ZeRO-3 too.
    frozen_zero3 = cfg.frozen_zero3 if cfg.frozen_zero3 is not None else (ds.zero_stage == 3 and not cfg.ref_on_cpu)
    frozen_engines = []
    if frozen_zero3:
        mb = plan.micro_batch_size
        if not cfg.lora.rank:  # a LoRA reference is the policy itself, partitioned by the policy's engine
            frozen_engines.append(dss.build_zero3_inference(ref_policy, ds=ds, micro_batch_size=mb))
        if reward_model is not None:
            frozen_engines.append(dss.build_zero3_inference(reward_model, ds=ds, micro_batch_size=mb))
    return policy_engine, critic_engine, frozen_engines


def critic_optim(cfg: PPOConfig):
    """The critic's optimizer settings: ``critic_optim`` with its lr at ``critic_lr_ratio * optim.lr``
    when the ratio is set (MOSS-RLHF: 3x the policy's)."""
    if cfg.critic_lr_ratio is None:
        return cfg.critic_optim
    return dataclasses.replace(cfg.critic_optim, lr=cfg.critic_lr_ratio * cfg.optim.lr)


def fix_critic_head_bias(critic: Critic, cfg: PPOConfig) -> None:
    """``ppo.critic_head_bias`` false: the value head's bias stays at its initial value (MOSS-RLHF's
    critic head has none; the reward model's bias, if any, stays a constant offset)."""
    if not cfg.critic_head_bias:
        critic.value_head.linear.bias.requires_grad_(False)
