"""PPO on DeepSpeed with every implementation detail: ``PPOTrainer(cfg.ppo, DIR).fit()``.

One iteration (DESIGN.md "PPO loop"), each phase timed:

    generate    HybridEngine on the live policy weights (KV cache; ZeRO-3 gathered once)
    score       truncate after the first stop token (EOS trick), reward model or function,
                missing-stop penalty; rollouts of all ranks gathered (``ppo_core.gather_rollout``)
    logprobs    old / reference log-probs and values with the fused ops, sharded by the first
                epoch's micro-batches (so the first ratio is exactly 1)
    advantages  shape_rewards -> gae -> masked_whiten (or grpo / rloo), fused
    train       PPO epochs over shuffled minibatches on DeepSpeed engines (``ppo_core.ppo_update``)
    then the KL controller update, metrics (TRL / N-details names), eval, checkpoint.

Output directory (as the other stages): config.yaml, metrics.jsonl, tensorboard/, checkpoints/
(policy, critic, optimizer and scheduler states, KL controller, iteration; every random choice
is a function of (seed, rank, iteration), so a resumed run repeats the uninterrupted one),
model/ (the final policy), plots/*.png and samples.jsonl (a few rollouts per iteration,
``rlhf_fast.trainers.watch``).
"""

from __future__ import annotations

import copy
import importlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from rlhf_fast import algos
from rlhf_fast import config as config_mod
from rlhf_fast.algos import Rollout
from rlhf_fast.config import BatchPlan, PPOConfig
from rlhf_fast.data import PromptDataset
from rlhf_fast.engine import HybridEngine, SamplingParams
from rlhf_fast.models import Critic, Policy, RewardModel
from rlhf_fast.trainers import _build, ppo_core
from rlhf_fast.trainers import deepspeed_setup as dss
from rlhf_fast.trainers.common import Checkpointer, MetricsLogger, epoch_order, make_progress, save_model_atomically, \
    start_fresh, write_stage_config
from rlhf_fast.trainers.runs import guarded_fit, resolve_save_every, stop_requested
from rlhf_fast.trainers.watch import SampleLogger, ppo_postfix

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


# ---- scoring ------------------------------------------------------------------------------------


def _import_user_module(module: str):
    """``importlib.import_module``, also from the current directory: the ``rlhf-fast`` console
    script, unlike ``python -m``, does not put it on sys.path, so ``my_rewards:fn`` next to the
    config was not found."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, cwd)
        return importlib.import_module(module)


def load_reward_function(spec: str, *, task=None) -> RewardFn:
    """``"package.module:function"`` -> the function; ``"task:gold"`` -> the built-in task's hidden
    gold reward (for debugging and upper bounds: it is what the pipeline evaluates with)."""
    if spec == "task:gold":
        if task is None:
            raise ValueError("reward.function 'task:gold' needs the built-in task (no data.train_file)")
        return lambda prompts, responses: task.gold_reward(responses, prompts)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"reward.function must look like 'package.module:function', got {spec!r}")
    try:
        fn = getattr(_import_user_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward.function {spec!r} cannot be loaded: {e} (searched the current directory and "
                         "sys.path; set PYTHONPATH to the module's directory)") from None
    if not callable(fn):
        raise ValueError(f"reward.function {spec!r} is not callable")
    return fn


def call_reward_function(fn: RewardFn, prompts: Sequence[str], responses: Sequence[str], *, index_offset: int = 0,
                         indices: Optional[Sequence[int]] = None, what: str = "prompt"):
    """(B,) float32 scores from a user's reward function, validated: one finite number per prompt,
    else a ValueError naming the prompt index (and the prompt); an exception raised by the function
    is re-raised as a RuntimeError naming the batch. ``indices``: the prompts' indices for the
    messages (default ``index_offset + i``); ``what``: what they index ("prompt", "eval prompt")."""
    idx = list(indices) if indices is not None else [index_offset + i for i in range(len(prompts))]
    try:
        out = fn(list(prompts), list(responses))
    except Exception as e:
        span = f"{what} indices {idx[0]}..{idx[-1]}" if idx else f"an empty batch of {what}s"
        first = f"; the first: {prompts[0][:80]!r}" if prompts else ""
        raise RuntimeError(f"reward function {getattr(fn, '__qualname__', fn)!s} raised {type(e).__name__}: {e} "
                           f"(on {len(prompts)} responses, {span}{first})") from e
    try:
        scores = torch.as_tensor(out, dtype=torch.float32).detach().cpu()
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward function returned {type(out).__name__}, not a sequence of numbers: {e}") from None
    if scores.shape != (len(prompts),):
        raise ValueError(f"reward function returned shape {tuple(scores.shape)} for {len(prompts)} prompts; "
                         f"expected ({len(prompts)},): one score per prompt")
    bad = (~torch.isfinite(scores)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"reward function returned {scores[i].item()} for {what} index {idx[i]} "
                         f"({prompts[i][:80]!r}); scores must be finite")
    return scores


# ---- composite engine for checkpoints -------------------------------------------------------------


class _Engines:
    """Saves / loads several DeepSpeed engines under one checkpoint directory (policy/, critic/)."""

    def __init__(self, **engines):
        self.engines = {k: v for k, v in engines.items() if v is not None}

    def save_checkpoint(self, path: str, *, tag: str, save_latest: bool = False) -> None:
        for name, e in self.engines.items():
            e.save_checkpoint(os.path.join(path, name), tag=tag, save_latest=save_latest)

    def load_checkpoint(self, path: str, *, tag: str, **kwargs):
        loaded = [e.load_checkpoint(os.path.join(path, name), tag=tag, **kwargs)[0] for name, e in self.engines.items()]
        return (path if all(p is not None for p in loaded) else None), None


class _OnDevice:
    """A frozen policy kept on another device: inputs go there, log-probs come back."""

    def __init__(self, policy: Policy, device):
        self.policy, self.device = policy, torch.device(device)

    def logprobs(self, input_ids, attention_mask, **kwargs):
        out = self.policy.logprobs(input_ids.to(self.device), attention_mask.to(self.device), **kwargs)
        return out.__class__(**{k: (v.to(input_ids.device) if isinstance(v, torch.Tensor) else v)
                                for k, v in vars(out).items()})


@dataclass
class _Timer:
    seconds: dict

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


# ---- the trainer --------------------------------------------------------------------------------


def resolve_stop_tokens(tokenizer, stop_tokens) -> list[int]:
    """Ids of ``ppo.generation.stop_tokens``: each entry is a token of the vocabulary (as
    ``convert_tokens_to_ids`` knows it) or a text that encodes to exactly one token (so "\\n"
    works with a byte-level BPE whose token is "Ċ"). Anything else is a ValueError naming it.
    When " " + entry is also one token (GPT-2's "Ġ." for "."), its id is added: the built-in task
    writes "a baby ." and its periods are all "Ġ.", so "." alone never stopped a response there."""
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for t in stop_tokens:
        if not isinstance(t, str) or not t:
            raise ValueError(f"ppo.generation.stop_tokens: entries must be non-empty strings, got {t!r}")
        tid = tokenizer.convert_tokens_to_ids(t)
        if tid is None or (unk is not None and tid == unk and t != tokenizer.unk_token):
            enc = tokenizer.encode(t, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(f"ppo.generation.stop_tokens: {t!r} is not a token of the tokenizer, and as text it "
                                 f"encodes to {len(enc)} tokens {enc[:8]}, not one")
            tid = enc[0]
        ids.append(int(tid))
        spaced = tokenizer.encode(" " + t, add_special_tokens=False)
        if len(spaced) == 1 and spaced[0] != tid and spaced[0] != unk:
            ids.append(int(spaced[0]))
    return ids


class PPOTrainer:
    """``PPOTrainer(cfg.ppo, "out/ppo").fit()`` trains the policy and returns the last metrics.

    ``reward_fn`` (optional) overrides ``cfg.reward``: ``fn(prompts, responses) -> scores``.
    """

    stage = "ppo"

    def __init__(self, cfg: PPOConfig, output_dir, *, resume: bool = False, overwrite: bool = False,
                 reward_fn: Optional[RewardFn] = None, dist_info: Optional[dss.DistInfo] = None):
        self.cfg, self.output_dir, self.resume, self.overwrite = cfg, Path(output_dir), resume, overwrite
        self.hp = cfg.algo
        self.dist = dist_info or dss.init_distributed(cfg.deepspeed.backend)
        self.is_main = self.dist.is_main
        self._reward_fn = reward_fn
        W = self.dist.world_size
        if cfg.rollout_batch_size % W:
            raise ValueError(f"ppo.rollout_batch_size ({cfg.rollout_batch_size}) must be a multiple of the world size ({W})")
        self.B = cfg.rollout_batch_size * cfg.samples_per_prompt
        self.local_prompts = cfg.rollout_batch_size // W
        mb = self.B // self.hp.num_minibatches
        if self.B % self.hp.num_minibatches or mb % W:
            raise ValueError(f"rollout batch {self.B} must split into algo.num_minibatches ({self.hp.num_minibatches}) "
                             f"minibatches divisible by the world size ({W})")
        local = mb // W
        micro = min(self.hp.micro_batch_size or local, local)
        # DeepSpeed steps the optimizer after grad_accum micro-batches: the micro-batches of one
        # minibatch on one rank (ppo_core.epoch_plan makes the same split).
        self.plan = BatchPlan(batch_size=micro * math.ceil(local / micro) * W, micro_batch_size=micro,
                              grad_accum=math.ceil(local / micro), world_size=W)
        self.total_steps = cfg.iterations * self.hp.num_epochs * self.hp.num_minibatches

    # -- setup -------------------------------------------------------------------------------------

    def _models(self):
        cfg = self.cfg
        self.tokenizer = _build.load_tokenizer(cfg.policy, cfg.data, source=cfg.policy.path)
        self.stop_token_ids = resolve_stop_tokens(self.tokenizer, cfg.generation.stop_tokens)  # before any model
        src = _build.model_source(cfg.policy, cfg.data, self.tokenizer)
        value_head = cfg.critic == "value_head"
        policy = Policy.from_pretrained(src, value_head=value_head, seed=cfg.policy.init_seed,
                                        attn_implementation=cfg.policy.attn_implementation,
                                        use_linear_logprobs=cfg.use_linear_logprobs)
        if policy.config.vocab_size < len(self.tokenizer):
            raise ValueError(f"policy vocabulary {policy.config.vocab_size} < tokenizer size {len(self.tokenizer)}: "
                             "start PPO from an SFT checkpoint (rlhf-fast sft) made with this tokenizer")
        ref = Policy(copy.deepcopy(policy.model), use_linear_logprobs=cfg.use_linear_logprobs).eval().requires_grad_(False)
        frozen_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.deepspeed.dtype)
        if frozen_dtype is not None:  # the frozen models compute in the training precision
            ref.to(frozen_dtype)
        # The frozen reference can live on the CPU (it only runs forwards): N+ offloads it for 6.9B.
        self.ref_policy = _OnDevice(ref.to("cpu"), "cpu") if cfg.ref_on_cpu else ref.to(self.dist.device)
        self.reward_model = None
        if self._reward_fn is None and cfg.reward.function is not None:
            self._reward_fn = load_reward_function(cfg.reward.function, task=self.task)
        if self._reward_fn is None:
            if cfg.reward.model_path is None:
                raise ValueError("ppo.reward: give reward.model_path (a directory from rlhf-fast rm) or reward.function")
            if not Path(cfg.reward.model_path).is_dir():
                raise ValueError(f"ppo.reward.model_path {cfg.reward.model_path!r} is not a directory")
            self.reward_model = RewardModel.from_pretrained(cfg.reward.model_path).eval().requires_grad_(False)
            self.reward_model.to(self.dist.device)
            if frozen_dtype is not None:
                self.reward_model.backbone.to(frozen_dtype)
        critic = None
        if cfg.critic == "separate" and self.hp.advantage_estimator == "gae":
            # N+ TL;DR / PPO-max: the critic starts from the reward model; else from the policy (zero head).
            critic = Critic.from_pretrained(cfg.reward.model_path) if cfg.reward.model_path else Critic(
                copy.deepcopy(policy.backbone))
        return policy.to(self.dist.device), critic.to(self.dist.device) if critic is not None else None

    def _data(self):
        cfg = self.cfg
        self.task = _build.get_task(cfg.data) if cfg.data.train_file is None else None
        if cfg.data.train_file is not None:
            train = _build.file_records(cfg.data.train_file, "ppo.data.train_file")
            if cfg.data.eval_file:
                evals = _build.file_records(cfg.data.eval_file, "ppo.data.eval_file")
            else:  # hold out the last eval_prompts prompts
                train, evals = train[: -cfg.eval_prompts], train[-cfg.eval_prompts:]
        else:
            train, evals = self.task.prompt_records("train"), self.task.prompt_records("eval")
        if cfg.data.max_train_examples:
            train = train[: cfg.data.max_train_examples]
        return train, evals[: cfg.eval_prompts]

    def setup(self) -> None:
        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        dss.seed_everything(cfg.seed, self.dist.rank)
        train, evals = self._data()
        if len(train) < cfg.rollout_batch_size:  # before any model is built
            raise ValueError(f"{len(train)} training prompts < ppo.rollout_batch_size ({cfg.rollout_batch_size})"
                             + (f"; {len(evals)} others were held out for evaluation (ppo.eval_prompts "
                                f"{cfg.eval_prompts})" if evals and cfg.data.eval_file is None else ""))
        policy, critic = self._models()
        kw = dict(prompt_field=cfg.data.prompt_field, max_prompt_length=cfg.data.max_prompt_length)
        self.prompts = PromptDataset(train, self.tokenizer, **kw)
        self.eval_prompts = PromptDataset(evals, self.tokenizer, **kw)
        self.collate = self.prompts.collator(pad_to_length=cfg.data.max_prompt_length)
        build = dict(plan=self.plan, total_steps=self.total_steps, sched=cfg.scheduler)
        ds = copy.deepcopy(cfg.deepspeed)
        ds.grad_clip = self.hp.max_grad_norm or 0.0
        self.policy_engine = dss.build_engine(policy, optim=cfg.optim, ds=ds, **build)
        self.critic_engine = dss.build_engine(critic, optim=cfg.critic_optim, ds=ds, **build) if critic else None
        # ZeRO-3 inference for the frozen models: partitioned in place (the objects stay the same;
        # their hooks gather each module's weights for its forward). Every rank runs the same
        # forwards: the same micro-batch counts as the policy, which is ZeRO-3 too.
        frozen_zero3 = cfg.frozen_zero3 if cfg.frozen_zero3 is not None else (ds.zero_stage == 3 and not cfg.ref_on_cpu)
        self.frozen_engines = []
        if frozen_zero3:
            mb = self.plan.micro_batch_size
            self.frozen_engines.append(dss.build_zero3_inference(self.ref_policy, ds=ds, micro_batch_size=mb))
            if self.reward_model is not None:
                self.frozen_engines.append(dss.build_zero3_inference(self.reward_model, ds=ds, micro_batch_size=mb))
        max_prompt = max(int(x.numel()) for x in self.prompts.input_ids + self.eval_prompts.input_ids)
        self.max_prompt = cfg.data.max_prompt_length or max_prompt
        self.gen = HybridEngine(self.policy_engine, pad_token_id=self.tokenizer.pad_token_id,
                                max_batch_size=cfg.generation.max_batch_size,
                                max_seq_len=self.max_prompt + cfg.generation.max_new_tokens,
                                decode=cfg.generation.decode)
        self.kl_ctl = self.hp.make_kl_controller()
        self.score_stats = algos.RunningMoments()  # PPO-max reward normalisation (algo.normalize_scores)
        log = cfg.logging
        self.checkpointer = Checkpointer(self.output_dir / "checkpoints", keep=log.keep_checkpoints, is_main=self.is_main)
        self.logger = MetricsLogger(self.output_dir, tensorboard=log.tensorboard, enabled=self.is_main)
        self.samples = SampleLogger(self.output_dir, rows=log.samples_per_iteration, enabled=self.is_main,
                                    metrics=self.logger)
        self.iteration = 0
        if self.resume and (ckpt := self.checkpointer.latest()) is not None:
            state = self.checkpointer.load(ckpt, self._engines(), stage=self.stage, config=config_mod.to_dict(cfg))
            self.iteration = int(state["iteration"])
            self.kl_ctl.load_state_dict(state["kl_controller"])
            self.score_stats.load_state_dict(state.get("score_stats", self.score_stats.state_dict()))
            self.logger.resume_from(self.iteration)
            self.samples.resume_from(self.iteration)
        else:
            start_fresh(self.output_dir, self.checkpointer, is_main=self.is_main)
        if self.is_main:
            write_stage_config(self.output_dir, self.stage, cfg)

    def _engines(self):
        return _Engines(policy=self.policy_engine, critic=self.critic_engine)

    # -- one iteration ---------------------------------------------------------------------------------

    def _sampling(self, seed: int) -> SamplingParams:
        g = self.cfg.generation
        stops = tuple(self.stop_token_ids)
        return SamplingParams(
            max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
            min_new_tokens=g.min_new_tokens, eos_token_id=self.tokenizer.eos_token_id if g.stop_at_eos else None,
            stop_token_ids=stops if g.stop_during_generation else (), seed=seed)

    def _prompt_batch(self, iteration: int) -> dict:
        """This rank's prompts of ``iteration``: the global order depends on (seed, epoch) only."""
        n, G = len(self.prompts), self.cfg.rollout_batch_size
        start = iteration * G
        idx = []
        while len(idx) < G:
            epoch, k = divmod(start + len(idx), n)
            order = epoch_order(n, self.cfg.seed, epoch)
            idx.extend(order[k : k + G - len(idx)].tolist())
        mine = idx[self.dist.rank * self.local_prompts : (self.dist.rank + 1) * self.local_prompts]
        mine = [i for i in mine for _ in range(self.cfg.samples_per_prompt)]  # grpo / rloo groups
        batch = self.collate([self.prompts[i] for i in mine])
        batch["prompts"] = [self.prompts.prompts[i] for i in mine]
        return batch

    def _respond(self, batch: dict, seed: int):
        """Generate, pad to max_new_tokens, truncate after the first stop token (EOS trick)."""
        ids = batch["input_ids"].to(self.dist.device)
        mask = batch["attention_mask"].to(self.dist.device)
        out = self.gen.generate(ids, mask, self._sampling(seed))
        R = self.cfg.generation.max_new_tokens
        pad = R - out.response_mask.shape[1]  # same R on every rank (the rollouts are gathered)
        resp = torch.nn.functional.pad(out.responses, (0, pad), value=self.tokenizer.pad_token_id)
        rmask = torch.nn.functional.pad(out.response_mask, (0, pad), value=False)
        gen_lp = torch.nn.functional.pad(out.logprobs, (0, pad), value=0.0)
        stops = self._stop_ids()
        if stops:
            t = algos.truncate_at_stop(resp, stops, pad_token_id=self.tokenizer.pad_token_id,
                                       min_length=self.cfg.generation.truncate_min_length, response_mask=rmask)
            resp, rmask, has_stop = t.response_ids, t.response_mask, t.has_stop
        else:  # fixed-length responses, EOS ignored ("N details" #4)
            has_stop = torch.ones(resp.shape[0], dtype=torch.bool, device=resp.device)
        return ids, mask.bool(), resp, rmask, has_stop, gen_lp

    def _stop_ids(self) -> list[int]:
        g = self.cfg.generation
        ids = list(self.stop_token_ids)
        if g.stop_at_eos:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    @torch.no_grad()
    def _score(self, q_ids, q_mask, resp, rmask, prompts, eval_rows: Optional[list[int]] = None) -> torch.Tensor:
        """Scores of the responses; ``eval_rows``: the eval prompts' indices (for error messages)."""
        if self.reward_model is not None:
            seq = torch.cat([q_ids, resp], 1)
            att = torch.cat([q_mask, rmask], 1).long()
            out = []
            for s in range(0, seq.shape[0], self.cfg.reward.batch_size):
                out.append(self.reward_model(seq[s : s + self.cfg.reward.batch_size], att[s : s + self.cfg.reward.batch_size]).scores)
            return torch.cat(out).float()
        texts = self.tokenizer.batch_decode(torch.where(rmask, resp, self.tokenizer.pad_token_id), skip_special_tokens=True)
        if eval_rows is not None:
            return call_reward_function(self._reward_fn, prompts, texts, indices=eval_rows,
                                        what="eval prompt").to(resp.device)
        offset = self.dist.rank * self.local_prompts * self.cfg.samples_per_prompt
        return call_reward_function(self._reward_fn, prompts, texts, index_offset=offset).to(resp.device)

    def train_iteration(self, iteration: int) -> dict:
        cfg, hp, timer = self.cfg, self.hp, _Timer({})
        seed = cfg.seed * 1_000_003 + iteration * 7919 + self.dist.rank * dss.SEED_STRIDE
        kl_coef = float(self.kl_ctl.value)
        t_start = time.perf_counter()
        with timer("generate"):
            batch = self._prompt_batch(iteration)
            q_ids, q_mask, resp, rmask, has_stop, gen_lp = self._respond(batch, seed)
        with timer("score"):
            scores = self._score(q_ids, q_mask, resp, rmask, batch["prompts"])
            raw_scores = scores.clone()
            scores = algos.apply_missing_stop_penalty(scores, has_stop, mode=cfg.generation.missing_stop_penalty,
                                                      value=cfg.generation.missing_stop_value)
            groups = None
            if cfg.samples_per_prompt > 1:
                groups = algos.contiguous_group_ids(resp.shape[0], cfg.samples_per_prompt, resp.device)
                groups = groups + self.dist.rank * self.local_prompts
            local = Rollout(q_ids, q_mask, resp, rmask, scores, group_ids=groups)
            self.samples.log(iteration + 1, self.tokenizer, batch["prompts"], resp, rmask, scores, raw_scores, has_stop)
            rollout = ppo_core.gather_rollout(local, pad_token_id=self.tokenizer.pad_token_id)
        generator = torch.Generator().manual_seed(cfg.seed * 7_777_777 + iteration)
        with timer("logprobs"):
            plan = ppo_core.first_epoch_plan(generator, rollout.batch_size, hp, device=resp.device)
            lp, ref_lp, values = ppo_core.score_logprobs(self.policy_engine.module, self._critic_module(),
                                                         self.ref_policy, rollout, hp, plan=plan)
        with timer("advantages"):
            exp = ppo_core.finish_experience(rollout.replace(logprobs=lp, ref_logprobs=ref_lp, values=values), hp,
                                             kl_coef=kl_coef, score_stats=self.score_stats)
        with timer("train"):
            self.policy_engine.train()
            critic_st = ppo_core.DeepSpeedStepper(self.critic_engine) if self.critic_engine else None
            lr = float(self.policy_engine.get_lr()[0])  # the lr this iteration trains with (before its scheduler steps)
            mb_stats = ppo_core.ppo_update(ppo_core.DeepSpeedStepper(self.policy_engine), exp, hp, kl_coef=kl_coef,
                                           generator=generator, critic_st=critic_st)
        stats = algos.PPOStats(objective=algos.objective_stats(exp, kl_coef), minibatches=mb_stats)
        row = stats.to_dict()
        self.kl_ctl.update(row["objective/kl"], rollout.batch_size)
        # health: engine log-probs vs the trainer's recomputation on this rank's rows (same
        # weights, same model code: only kernel-level differences remain)
        start = self.dist.rank * local.batch_size
        mine = lp[start : start + local.batch_size]
        gap = torch.where(rmask, (mine - gen_lp).abs(), 0.0).max()
        elapsed = time.perf_counter() - t_start
        n_tokens = float(exp.response_mask.sum())
        raw_sum, missing, n_rows = dss.all_reduce_sum(
            [float(raw_scores.sum()), float((~has_stop).sum()), float(raw_scores.numel())], self.dist.device)
        row.update({
            "objective/raw_scores": raw_sum / n_rows, "objective/missing_stop_frac": missing / n_rows,
            "generation/logprob_gap_max": float(gap), "perf/tokens_per_s": n_tokens / max(elapsed, 1e-9),
            "perf/iteration_s": elapsed, "train/lr": lr,
        })
        row.update({f"time/{k}_s": v for k, v in timer.seconds.items()})
        return row

    def _critic_module(self):
        return self.critic_engine.module if self.critic_engine is not None else None

    # -- evaluation --------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Samples on the held-out prompts (fixed seed, the training sampling settings): mean
        reward-model score, gold score (built-in task), KL to the reference, response length."""
        rows = list(range(self.dist.rank, len(self.eval_prompts), self.dist.world_size))
        if not rows:
            return {}
        batch = self.collate([self.eval_prompts[i] for i in rows])
        batch["prompts"] = [self.eval_prompts.prompts[i] for i in rows]
        q_ids, q_mask, resp, rmask, has_stop, _ = self._respond(batch, seed=self.cfg.seed * 31 + self.dist.rank)
        scores = self._score(q_ids, q_mask, resp, rmask, batch["prompts"], eval_rows=rows)
        r = Rollout(q_ids, q_mask, resp, rmask, scores)
        lp = self.policy_engine.module.logprobs(r.sequences, r.attention_mask, temperature=self.hp.temperature,
                                                response_start=r.response_start).logprobs
        ref = self.ref_policy.logprobs(r.sequences, r.attention_mask, temperature=self.hp.temperature,
                                       response_start=r.response_start).logprobs
        kl = torch.where(rmask, lp - ref, 0.0).sum(-1)
        sums = [float(scores.sum()), float(kl.sum()), float(rmask.sum()), float(len(rows)), float((~has_stop).sum())]
        gold = 0.0
        if self.task is not None:
            texts = self.tokenizer.batch_decode(torch.where(rmask, resp, self.tokenizer.pad_token_id),
                                                skip_special_tokens=True)
            gold = float(sum(self.task.gold_reward(texts, batch["prompts"])))
        s, k, n_tok, n, miss, g = dss.all_reduce_sum(sums + [gold], self.dist.device)
        out = {"eval/score": s / n, "eval/kl": k / n, "eval/response_length": n_tok / n, "eval/missing_stop_frac": miss / n}
        if self.task is not None:
            out["eval/gold_score"] = g / n
        return out

    # -- the loop --------------------------------------------------------------------------------------

    def _checkpoint(self) -> None:
        self.checkpointer.save(self.iteration, engine=self._engines(), save_model=self._save_policy,
                               state={"iteration": self.iteration, "kl_controller": self.kl_ctl.state_dict(),
                                      "score_stats": self.score_stats.state_dict(), "stage": self.stage,
                                      "config": config_mod.to_dict(self.cfg)})

    def _save_policy(self, directory: Path) -> None:
        module = self.policy_engine.module
        with dss.full_parameters(module, self.cfg.deepspeed.zero_stage):
            if self.is_main:
                self._write_policy(module, directory)

    def _write_policy(self, module, directory: Path) -> None:
        module.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @guarded_fit
    def fit(self) -> dict:
        """Runs (or resumes) ``cfg.iterations`` iterations; evaluates before the first (the SFT
        policy) and every ``logging.eval_every``; writes ``DIR/model`` and plots; returns the last row."""
        self.setup()
        cfg, log = self.cfg, self.cfg.logging
        save_every = resolve_save_every(log.save_every, cfg.iterations)
        bar = make_progress(cfg.iterations, self.iteration, desc="ppo",
                            enabled=self.is_main and log.progress_bar and not os.environ.get("RLHF_FAST_NO_TQDM"))
        last: dict = {}
        if self.iteration == 0:
            first = self.evaluate()
            self.logger.log(0, first)
            last = first
        while self.iteration < cfg.iterations:
            if cfg.stop_after_iterations and self.iteration >= cfg.stop_after_iterations:
                break
            row = self.train_iteration(self.iteration)
            self.iteration += 1
            final = self.iteration == cfg.iterations
            if (log.eval_every and self.iteration % log.eval_every == 0) or final:
                row.update(self.evaluate())
            self.logger.log(self.iteration, row)
            last = row
            bar.update(1)
            bar.set_postfix(ppo_postfix(row))
            stopping = not final and stop_requested(self.dist)  # Ctrl-C (rlhf_fast/trainers/runs.py)
            if (save_every and self.iteration % save_every == 0) or final or \
                    self.iteration == cfg.stop_after_iterations or stopping:
                self._checkpoint()
            if stopping:
                break
        bar.close()
        if self.iteration == cfg.iterations:
            if cfg.deepspeed.zero_stage == 3:
                self._save_policy(self.output_dir / "model")
            else:
                save_model_atomically(self.output_dir / "model", lambda d: self._write_policy(self.policy_engine.module, d),
                                      is_main=self.is_main)
            if self.is_main:
                from rlhf_fast.trainers.plots import plot_ppo_metrics

                plot_ppo_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "plots")
        self.logger.close()
        dss.barrier()
        return last
