"""PPO on DeepSpeed with every implementation detail: ``PPOTrainer(cfg.ppo, DIR).fit()``.

The loop is the shared ``StageTrainer`` (set-up, resume, checkpoints, final model); the run's
parts (models, engines, generator, scorer, rollout stage) come from one builder,
``trainers/ppo_parts.py: build_ppo_parts``, as one frozen record; one step is one PPO iteration, read top to bottom in ``run_step`` (docs/architecture.md, "One PPO iteration"),
each phase timed:

    generate + score   ``RolloutStage.collect`` (trainers/rollout.py): prompts -> the hybrid engine
                       on the live policy weights -> truncation after the first stop token (EOS
                       trick) -> reward model or function -> missing-stop penalty; the rollouts of
                       all ranks gathered (``ppo_core.gather_rollout``)
    logprobs           old / reference log-probs and values with the fused ops, sharded by the
                       first epoch's micro-batches (so the first ratio is exactly 1)
    advantages         shape_rewards -> the registered estimator (gae -> masked_whiten, grpo, rloo)
    train              PPO epochs over shuffled minibatches on DeepSpeed engines (``ppo_core.ppo_update``)
    then the KL controller update and the metrics (TRL / N-details names).

Output directory (as the other stages): config.yaml, metrics.jsonl, tensorboard/, checkpoints/
(policy, critic, optimizer and scheduler states, KL controller, iteration; every random choice
is a function of (seed, rank, iteration), so a resumed run repeats the uninterrupted one),
model/ (the final policy), plots/*.png and samples.jsonl (a few rollouts per iteration, also
as TensorBoard text).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch

from rlhf_fast import algos
from rlhf_fast.algos import Rollout
from rlhf_fast.algos.old_logprobs import OLD_LOGPROB_SOURCES
from rlhf_fast.config import BatchPlan, PPOConfig, validate
from rlhf_fast.models import lora
from rlhf_fast.trainers import _build, ppo_core
from rlhf_fast.trainers.async_rollout import AsyncRollouts, StalenessSchedule
from rlhf_fast.trainers import deepspeed_setup as dss
from rlhf_fast.trainers.stage_loop import StageTrainer
from rlhf_fast.trainers.ppo_parts import build_ppo_parts
from rlhf_fast.trainers.watch import SampleLogger, ppo_postfix
from rlhf_fast.trainers.rollout import (  # noqa: F401  (re-exported: the trainer's public helpers)
    PhaseTimer,
    PromptSchedule,
    RewardFn,
    RolloutStage,
    Scorer,
    call_reward_function,
    load_reward_function,
    iteration_seed,
    resolve_stop_tokens,
)


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


class PPOTrainer(StageTrainer):
    """``PPOTrainer(cfg.ppo, "out/ppo").fit()`` trains the policy and returns the last metrics.

    ``cfg``: a ``PPOConfig``: ``policy.path`` (an SFT output), ``reward.model_path`` (a directory
    from ``rlhf-fast rm`` or an HF ``AutoModelForSequenceClassification`` one, loaded with its
    trained head by ``rlhf_fast.models.load_reward_model``) or ``reward.function``, and prompts in
    ``data.train_file`` (text or chat records; checked in the constructor). ``output_dir``: the
    stage directory. ``resume``: continue from its latest checkpoint. ``reward_fn`` (optional)
    overrides ``cfg.reward``: ``fn(prompts, responses) -> scores``. ``dist_info``: an already
    initialised process group.
    """

    stage = "ppo"
    log_every_step = True

    def __init__(self, cfg: PPOConfig, output_dir, *, resume: bool = False, overwrite: bool = False,
                 reward_fn: Optional[RewardFn] = None, dist_info: Optional[dss.DistInfo] = None):
        validate(cfg, "ppo")  # a config built in code skips load_config's checks
        _build.check_data_files(cfg.data, self.stage)  # bad records fail before distributed set-up and models
        super().__init__(cfg, output_dir, resume=resume, overwrite=overwrite, dist_info=dist_info)
        g = cfg.generation  # the log-probs are under the sampler's filter unless algo sets its own
        self.hp = cfg.algo.replace(top_k=g.top_k if cfg.algo.top_k is None else cfg.algo.top_k,
                                   top_p=g.top_p if cfg.algo.top_p is None else cfg.algo.top_p)
        self.old_from_rollout = OLD_LOGPROB_SOURCES[cfg.old_logprobs].from_rollout
        # asynchronous rollouts (trainers/async_rollout.py): the workers start with the first step
        self.correction = algos.OFF_POLICY_CORRECTIONS[cfg.rollout.correction] if cfg.rollout.max_staleness else None
        self.async_rollouts: Optional[AsyncRollouts] = None
        self._reward_fn = reward_fn
        W = self.dist.world_size
        if cfg.rollout.worker_count and W > 1:
            raise ValueError(f"ppo.rollout.workers needs one trainer process (got a world of {W}): the rollout workers "
                             "copy a single process's policy")
        if cfg.rollout_batch_size % W:
            raise ValueError(f"ppo.rollout_batch_size ({cfg.rollout_batch_size}) must be a multiple of the world size ({W})")
        self.B = cfg.rollout_batch_size * cfg.samples_per_prompt  # global rollout rows
        try:
            layout = ppo_core.MinibatchLayout.of(self.B, self.hp, W)
        except ValueError:
            raise ValueError(f"rollout batch {self.B} must split into algo.num_minibatches ({self.hp.num_minibatches}) "
                             f"minibatches divisible by the world size ({W})") from None
        # DeepSpeed steps the optimizer after grad_accum micro-batches: the micro-batches of one
        # minibatch on one rank (the same layout the update loop cuts).
        self.plan = BatchPlan(batch_size=layout.micro * layout.micro_batches * W, micro_batch_size=layout.micro,
                              grad_accum=layout.micro_batches, world_size=W)
        self.total_steps = cfg.iterations * self.hp.num_epochs * self.hp.num_minibatches  # optimizer steps

    # -- set-up ------------------------------------------------------------------------------------

    def setup_stage(self) -> None:
        self.parts = p = build_ppo_parts(self.cfg, self.hp, plan=self.plan, dist=self.dist, reward_fn=self._reward_fn)
        # the parts the iteration reads, by the names the trainer has always had
        self.task, self.tokenizer, self.stop_token_ids = p.task, p.tokenizer, p.stop_token_ids
        self.prompts, self.eval_prompts, self.collate, self.max_prompt = p.prompts, p.eval_prompts, p.collate, p.max_prompt
        self.policy_engine = self.engine = p.policy_engine
        self.critic_engine, self.frozen_engines = p.critic_engine, p.frozen_engines
        self.ref_policy, self.reward_model, self.gen, self.rollouts = p.ref_policy, p.reward_model, p.generator, p.rollouts
        self.kl_ctl = self.hp.make_kl_controller()
        self.score_stats = algos.RunningMoments()  # PPO-max reward normalisation (algo.normalize_scores)

    def _setup(self) -> None:
        super()._setup()
        self.samples = SampleLogger(self.output_dir, rows=self.cfg.logging.samples_per_iteration, enabled=self.is_main,
                                    metrics=self.logger)
        self.samples.resume_from(self.step)  # a resumed run drops the rows after its checkpoint

    # -- one iteration ---------------------------------------------------------------------------------

    def run_step(self) -> dict:
        """PPO iteration ``self.step``: rollout -> experience -> update -> metrics."""
        cfg, hp, iteration, timer = self.cfg, self.hp, self.step, PhaseTimer({})
        kl_coef = float(self.kl_ctl.value)
        t_start = time.perf_counter()
        local, extras, async_row = self._collect(iteration, timer)  # generate, score (here or in a worker)
        with timer("score"):
            self.samples.log(iteration + 1, self.tokenizer, extras.prompts, extras.score_ids, extras.score_mask,
                             local.scores, extras.raw_scores, extras.has_stop, turns=extras.turns)
            if self.old_from_rollout or self.correction is not None:  # the engine's log-probs travel with the rollout: (B, R)
                local = local.replace(logprobs=torch.where(local.train_mask, extras.engine_logprobs, 0.0))
            rollout = ppo_core.gather_rollout(local, pad_token_id=self.tokenizer.pad_token_id)  # (B, ...) all ranks
        generator = torch.Generator().manual_seed(cfg.seed * 7_777_777 + iteration)  # minibatch permutations
        with timer("logprobs"):
            lp, ref_lp, values, trainer_lp = self._experience_logprobs(rollout, generator, iteration)  # (B, R) each
        with timer("advantages"):
            exp = ppo_core.finish_experience(rollout.replace(logprobs=lp, ref_logprobs=ref_lp, values=values), hp,
                                             kl_coef=kl_coef, score_stats=self.score_stats)
            if self.correction is not None:  # behaviour = the engine's (rollout.logprobs), proximal = lp (recomputed)
                cap = cfg.rollout.importance_weight_cap if self.correction.truncates else None
                exp = exp.replace(is_weights=self.correction.weights(lp, rollout.logprobs, exp.response_mask, cap))
                async_row.update(algos.WeightStats.of(lp, rollout.logprobs, exp.response_mask, cap).to_dict())
        with timer("train"):
            lr = float(self.policy_engine.get_lr()[0])  # the lr this iteration trains with (before its scheduler steps)
            mb_stats = self._update(exp, kl_coef, generator)
        row = algos.PPOStats(objective=algos.objective_stats(exp, kl_coef), minibatches=mb_stats).to_dict()
        self.kl_ctl.update(row["objective/kl"], rollout.batch_size)
        elapsed = time.perf_counter() - t_start
        # the engine-vs-trainer gap compares the same weights: only a batch of staleness 0
        row.update(self._rollout_health(trainer_lp if not async_row.get("async/staleness") else None, local, extras))
        row.update({"policy/first_minibatch_approxkl": float(mb_stats[0].approxkl),
                    "policy/first_minibatch_clipfrac": float(mb_stats[0].clipfrac)})
        row.update({"perf/tokens_per_s": float(exp.response_mask.sum()) / max(elapsed, 1e-9),
                    "perf/iteration_s": elapsed, "train/lr": lr})
        row.update({f"time/{k}_s": v for k, v in timer.seconds.items()})
        row.update(async_row)
        return row

    def _collect(self, iteration: int, timer: PhaseTimer):
        """This rank's rollout of ``iteration`` and its extras, generated here or taken from a rollout
        worker, and the ``async/*`` metrics (staleness, wait, weight sync; empty when synchronous)."""
        seed = iteration_seed(self.cfg.seed, iteration, self.dist.rank)
        if not self.cfg.rollout.worker_count:
            local, extras = self.rollouts.collect(iteration, seed, timer)
            return local, extras, {}
        if self.async_rollouts is None:
            self._start_workers()
        got, waited = self.async_rollouts.collect(iteration)
        for k, v in got.seconds.items():  # the worker's generate / score seconds
            timer.seconds[k] = timer.seconds.get(k, 0.0) + v
        sync = self.async_rollouts.sync.stats
        return got.rollout, got.extras, {"async/staleness": float(iteration - got.version),
                                         "async/rollout_wait_s": waited, "async/weight_sync_s": sync.last_seconds,
                                         "async/weight_sync_mb": sync.bytes / 2**20}

    def _start_workers(self) -> None:
        total = self.loop_length()
        end = min(total, self.stop_after() or total)
        r = self.cfg.rollout
        schedule = StalenessSchedule(start=self.step, end=end, max_staleness=r.max_staleness, workers=r.worker_count)
        seed, rank = self.cfg.seed, self.dist.rank
        self.async_rollouts = AsyncRollouts(self.rollouts, self.policy_engine.module, r, schedule,
                                            lambda it: iteration_seed(seed, it, rank))
        self.async_rollouts.start()

    def fit(self) -> dict:
        try:
            return super().fit()
        finally:  # normal end, error, Ctrl-C / SIGTERM: no rollout worker outlives the trainer's fit
            if self.async_rollouts is not None:
                self.async_rollouts.close()
                self.async_rollouts = None

    def _experience_logprobs(self, rollout: Rollout, generator: torch.Generator, iteration: int):
        """(old log-probs, reference log-probs, values, the trainer's own old log-probs or None),
        (B, R) each: the old ones recomputed, or the engine's (``ppo.old_logprobs: rollout``, which
        recomputes them only every ``logprob_gap_every`` iterations, for the gap metric)."""
        plan = ppo_core.first_epoch_plan(generator, rollout.batch_size, self.hp, device=rollout.response_ids.device,
                                         tokens=ppo_core.row_tokens(rollout))
        models = (self.policy_engine.module, self._critic_module(), self.ref_policy)
        if not self.old_from_rollout:
            lp, ref_lp, values = ppo_core.score_logprobs(*models, rollout, self.hp, plan=plan)
            return lp, ref_lp, values, lp
        lp, ref_lp, values = ppo_core.score_logprobs(*models, rollout, self.hp, plan=plan, old_logprobs=rollout.logprobs)
        trainer_lp = None
        if iteration % self.cfg.logprob_gap_every == 0:
            trainer_lp, _, _ = ppo_core.score_logprobs(*models, rollout, self.hp, plan=plan)
        return lp, ref_lp, values, trainer_lp

    def _update(self, exp: Rollout, kl_coef: float, generator: torch.Generator) -> list:
        self.policy_engine.train()
        critic_st = ppo_core.DeepSpeedStepper(self.critic_engine) if self.critic_engine else None
        stats = ppo_core.ppo_update(ppo_core.DeepSpeedStepper(self.policy_engine), exp, self.hp, kl_coef=kl_coef,
                                    generator=generator, critic_st=critic_st)
        self.gen.on_weights_updated()  # the Generator contract: after the optimizer steps, before the next rollout
        if self.async_rollouts is not None:
            self.async_rollouts.after_update(self.step)  # version step + 1 to the workers that will need it
        return stats

    def _rollout_health(self, lp: Optional[torch.Tensor], local: Rollout, extras) -> dict:
        """Raw score and missing-stop fraction over all ranks, and the engine-vs-trainer log-prob gap
        on this rank's rows (same weights, same model code: only kernel-level differences remain;
        absent in the iterations where ``old_logprobs: rollout`` skips the recomputation)."""
        raw = extras.raw_scores
        raw_sum, missing, n_rows = dss.all_reduce_sum(
            [float(raw.sum()), float((~extras.has_stop).sum()), float(raw.numel())], self.dist.device)
        out = {"objective/raw_scores": raw_sum / n_rows, "objective/missing_stop_frac": missing / n_rows}
        if lp is not None:
            start = self.dist.rank * local.batch_size
            mine = lp[start : start + local.batch_size]  # (b, R)
            out["generation/logprob_gap_max"] = float(
                torch.where(local.train_mask, (mine - extras.engine_logprobs).abs(), 0.0).max())
        if self.hp.dynamic_sampling:  # DAPO: rounds this iteration took, informative share of the first (this rank)
            out.update({"objective/sampling_rounds": float(extras.sampling_rounds),
                        "objective/informative_frac": extras.informative_frac})
        return out

    def _critic_module(self):
        return self.critic_engine.module if self.critic_engine is not None else None

    # -- evaluation --------------------------------------------------------------------------------

    def begin(self) -> dict:
        return self.evaluate()  # the SFT policy's figures, logged at step 0

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Samples on the held-out prompts (fixed seed, the training sampling settings): mean
        reward-model score, gold score (built-in task), KL to the reference, response length."""
        rows = list(range(self.dist.rank, len(self.eval_prompts), self.dist.world_size))
        if not rows:
            return {}
        batch = self.collate([self.eval_prompts[i] for i in rows])
        prompts = [self.eval_prompts.prompts[i] for i in rows]
        r = self.rollouts.respond({**batch, "prompts": prompts}, seed=self.cfg.seed * 31 + self.dist.rank)
        ep = r.episodes  # multi-turn: the environment's last reward is the score (and, for a task, the gold)
        scores = ep.final_reward if ep is not None else self.rollouts.scorer(r, prompts, eval_rows=rows)  # (b,)
        roll = Rollout(r.query_ids, r.query_mask, r.response_ids, r.response_mask, scores,
                       action_mask=None if ep is None else ep.action_mask)
        kw = dict(temperature=self.hp.temperature, response_start=roll.response_start)
        lp = self.policy_engine.module.logprobs(roll.sequences, roll.attention_mask, **kw,
                                                **self.hp.logprob_filter()).logprobs
        ref = self.ref_policy.logprobs(roll.sequences, roll.attention_mask, **kw,
                                       **self.hp.logprob_filter(reference=True)).logprobs
        kl = torch.where(roll.train_mask, lp - ref, 0.0).sum(-1)  # (b,)
        # length and gold score of the response as scored (truncated after the stop token)
        sums = [float(scores.sum()), float(kl.sum()), float(r.score_mask.sum()), float(len(rows)),
                float((~r.has_stop).sum())]
        gold = 0.0
        if self.task is not None and ep is not None:
            gold = float(ep.final_reward.sum())
        elif self.task is not None:
            texts = self.tokenizer.batch_decode(torch.where(r.score_mask, r.score_ids, self.tokenizer.pad_token_id),
                                                skip_special_tokens=True)
            gold = float(sum(self.task.gold_reward(texts, prompts)))
        s, k, n_tok, n, miss, g = dss.all_reduce_sum(sums + [gold], self.dist.device)
        out = {"eval/score": s / n, "eval/kl": k / n, "eval/response_length": n_tok / n,
               "eval/missing_stop_frac": miss / n}
        if self.task is not None:
            out["eval/gold_score"] = g / n
        return out

    # -- the StageTrainer hooks --------------------------------------------------------------------

    def loop_length(self) -> int:
        return self.cfg.iterations

    def stop_after(self) -> Optional[int]:
        return self.cfg.stop_after_iterations

    def checkpoint_engine(self):
        return _Engines(policy=self.policy_engine, critic=self.critic_engine)

    def trainer_state(self) -> dict:
        return {"iteration": self.step, "kl_controller": self.kl_ctl.state_dict(),
                "score_stats": self.score_stats.state_dict()}

    def load_trainer_state(self, state: dict) -> None:
        self.gen.on_weights_updated()  # the checkpoint's weights are in the policy now
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.score_stats.load_state_dict(state.get("score_stats", self.score_stats.state_dict()))

    def progress_postfix(self, row: dict) -> dict:
        return ppo_postfix(row)

    def write_model(self, module, directory: Path) -> None:
        lora.save_model(module, directory, merged=self.cfg.lora.save_merged)
        self.tokenizer.save_pretrained(directory)

    def on_complete(self) -> None:
        if self.is_main:
            from rlhf_fast.trainers.plots import plot_ppo_metrics

            plot_ppo_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "plots")
