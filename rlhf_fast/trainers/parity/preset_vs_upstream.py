"""The ``lm_human_preferences`` preset against openai/lm-human-preferences, update for update.

``compare_lm_human_preferences`` runs PPO updates twice from the same tiny float64 policy, on
the same hand-built rollouts (responses with a stop token mid-sequence, before the minimum
length, and none) and the same minibatch order:

- rlhf_fast's code under the preset: ``algos.postprocess_responses`` with the preset's
  ``generation`` section, the missing-stop penalty, ``ppo_core.score_logprobs`` /
  ``finish_experience`` / ``ppo_update`` with the preset's ``algo``, the optimizer and scheduler
  the trainer builds (``deepspeed_setup.make_optimizer`` / ``make_scheduler`` /
  ``ppo_schedule``) and the preset's KL controller — the steps of ``PPOTrainer.run_step``
  after generation;
- the float64 re-derivation of upstream's update (``rlhf_fast.reference.lm_human_preferences``).

It reports the largest parameter difference against the largest parameter update.
tests/test_preset_parity.py runs it small; scripts/check_preset_parity.py is the held-out check.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_fast import algos
from rlhf_fast import config as C
from rlhf_fast.reference import lm_human_preferences as upstream
from rlhf_fast.trainers import deepspeed_setup as dss
from rlhf_fast.trainers import ppo_core

PAD, STOP = 0, 5  # the tiny vocabulary's pad id and the token that plays '.'


def tiny_policy(vocab: int = 40, seed: int = 0, value_std: float = 0.3, *, value_head: bool = True):
    """A float64 2-layer GPT-2 policy (dropout off), with a value head unless ``value_head`` is
    False. The value head is drawn N(0, value_std) instead of upstream's zero init so the value
    clipping acts from the first minibatch."""
    from rlhf_fast.models import Policy

    policy = Policy.from_pretrained(tiny_model_config(vocab), seed=seed, value_head=value_head)
    if value_head:
        with torch.no_grad():
            policy.value_head.linear.weight.normal_(0, value_std, generator=torch.Generator().manual_seed(seed + 1))
    return policy.double().eval()


def tiny_model_config(vocab: int = 40):
    """The tiny GPT-2 config of the parity checks (pad id ``PAD``)."""
    from rlhf_fast.tasks import tiny_config

    return tiny_config("gpt2", vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)


def hand_rollout(B: int, Q: int, R: int, seed: int, *, vocab: int = 40, min_length: int = 2):
    """(queries, query_mask, responses): left-padded queries; fixed-length responses in which row
    0 stops mid-sequence, row 1 has a stop only before ``min_length`` (does not count), row 2 has
    none, the others are random with stop tokens sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(6, vocab, (B, Q), generator=g)
    pad = torch.randint(0, Q - 1, (B,), generator=g)
    qm = torch.arange(Q) >= pad[:, None]
    q[~qm] = PAD
    r = torch.randint(6, vocab, (B, R), generator=g)
    r[torch.rand(B, R, generator=g) < 0.15] = STOP
    r[0, :] = torch.randint(6, vocab, (R,), generator=g)
    r[0, min_length + 1] = STOP
    r[1, :] = torch.randint(6, vocab, (R,), generator=g)
    r[1, max(min_length - 1, 0)] = STOP
    r[2, :] = torch.randint(6, vocab, (R,), generator=g)
    return q, qm, r


def score_fn(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in reward of the truncated response (B,) float64: depends on every
    kept token and on the length, so truncating at the wrong place changes it."""
    x = torch.where(mask, ids, 0).double()
    return torch.sin(x.sum(-1) / 7.0) + 0.1 * mask.sum(-1).double()


@dataclass
class ParityReport:
    """max_param_diff: largest |fast - upstream| over all parameters after the last update.
    max_param_update: largest |upstream - initial|. ratio: their quotient (the issue's bound: 1e-3).
    lrs_fast / lrs_upstream: the lr of every optimizer step. kl_coefs: beta of each update (both
    sides). scores_equal / masks: the scoring inputs agree exactly."""

    max_param_diff: float
    max_param_update: float
    ratio: float
    lrs_fast: list
    lrs_upstream: list
    kl_coefs: list
    scores_equal: bool


def compare_lm_human_preferences(
    *, updates: int = 2, n_updates: int = 3, B: int = 8, Q: int = 4, R: int = 8, nminibatches: int = 2,
    noptepochs: int = 2, micro_batch_size: Optional[int] = 2, lr: float = 1e-3, seed: int = 0,
    min_length: int = 2, vocab: int = 40, overrides: tuple = (),
) -> ParityReport:
    """``updates`` PPO updates of a run planned for ``n_updates`` under ``--preset
    lm_human_preferences`` (plus the size ``overrides`` this function adds: lr, batch geometry,
    ``truncate_min_length``), each on a fresh hand-built rollout, rlhf_fast vs upstream."""
    cfg = C.load_config(presets=["lm_human_preferences"], overrides=[
        "--ppo.optim.lr", str(lr), "--ppo.iterations", str(n_updates), "--ppo.algo.num_epochs", str(noptepochs),
        "--ppo.algo.num_minibatches", str(nminibatches), "--ppo.algo.micro_batch_size",
        "null" if micro_batch_size is None else str(micro_batch_size),
        "--ppo.generation.truncate_min_length", str(min_length), *overrides]).ppo
    hp, g = cfg.algo, cfg.generation
    policy0 = tiny_policy(vocab, seed)
    ref_policy = copy.deepcopy(policy0).requires_grad_(False)
    fast, up = copy.deepcopy(policy0), copy.deepcopy(policy0)

    # rlhf_fast: what PPOTrainer.setup builds for the policy engine, on a plain torch optimizer
    params = [p for p in fast.parameters() if p.requires_grad]
    opt = dss.make_optimizer(params, cfg.optim, offload=False)
    sched = dss.make_scheduler(opt, optim=cfg.optim, sched=cfg.scheduler, **dss.ppo_schedule(
        cfg.lr_schedule_unit, iterations=cfg.iterations, steps_per_iteration=hp.num_epochs * hp.num_minibatches))
    stepper = _RecordingStepper(fast, opt, max_grad_norm=hp.max_grad_norm, scheduler=sched)
    kl_ctl = hp.make_kl_controller()
    # upstream
    tf_adam = upstream.TFAdam([p for p in up.parameters() if p.requires_grad], eps=cfg.optim.eps,
                              beta1=cfg.optim.betas[0], beta2=cfg.optim.betas[1])
    beta_up = hp.kl_init

    lrs_up, betas, scores_equal = [], [], True
    for k in range(updates):
        q, qm, resp = hand_rollout(B, Q, R, seed + 100 + k, vocab=vocab, min_length=min_length)
        gen = torch.Generator().manual_seed(seed * 7919 + k)
        perm_gen = torch.Generator()
        perm_gen.set_state(gen.get_state())
        perms = [torch.randperm(B, generator=perm_gen) for _ in range(hp.num_epochs)]  # ppo_update's draws
        beta = float(kl_ctl.value)
        scores = _fast_update(cfg, fast, ref_policy, stepper, kl_ctl, q, qm, resp, gen, beta)
        up_scores, res = _upstream_update(cfg, up, ref_policy, tf_adam, q, qm, resp, beta_up, k, n_updates, perms,
                                          min_length)
        scores_equal &= bool(torch.equal(up_scores.to(scores.dtype), scores))
        lrs_up.extend([res.lr] * (hp.num_epochs * hp.num_minibatches))
        betas.append((beta, beta_up))
        beta_up = upstream.adaptive_kl(beta_up, float(res.kl.mean()), B, target=hp.kl_target, horizon=hp.kl_horizon)
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(fast.parameters(), up.parameters()))
        moved = max(float((b - a).abs().max()) for a, b in zip(policy0.parameters(), up.parameters()))
    return ParityReport(diff, moved, diff / moved, stepper.lrs, lrs_up, betas, scores_equal)


def _fast_update(cfg, fast, ref_policy, stepper, kl_ctl, q, qm, resp, gen, beta) -> torch.Tensor:
    """One rlhf_fast update (PPOTrainer's rollout post-processing, experience and update on a
    hand-built rollout); returns the scores it trained on."""
    hp, g = cfg.algo, cfg.generation
    post = algos.postprocess_responses(resp, torch.ones_like(resp, dtype=torch.bool), [STOP], pad_token_id=PAD,
                                       min_length=g.truncate_min_length, after_stop=g.after_stop)
    scores = algos.apply_missing_stop_penalty(score_fn(post.score_ids, post.score_mask), post.has_stop,
                                              mode=g.missing_stop_penalty, value=g.missing_stop_value)
    rollout = algos.Rollout(q, qm, post.response_ids, post.train_mask, scores)
    plan = ppo_core.first_epoch_plan(gen, rollout.batch_size, hp)
    lp, ref_lp, values = ppo_core.score_logprobs(fast, None, ref_policy, rollout, hp, plan=plan)
    exp = ppo_core.finish_experience(rollout.replace(logprobs=lp, ref_logprobs=ref_lp, values=values), hp,
                                     kl_coef=beta, score_stats=algos.RunningMoments())
    ppo_core.ppo_update(stepper, exp, hp, kl_coef=beta, generator=gen)
    kl_ctl.update(float(algos.objective_stats(exp, beta).kl), rollout.batch_size)
    return scores


def _upstream_update(cfg, up, ref_policy, tf_adam, q, qm, resp, beta_up, k, n_updates, perms, min_length):
    """One update of the float64 re-derivation of upstream's code; returns (its scores, its result)."""
    hp = cfg.algo
    scored = upstream.postprocess(resp, STOP, min_length, PAD)
    up_scores = score_fn(scored, scored != PAD)
    up_scores = torch.where(upstream.passes_filter(resp, STOP, min_length), up_scores, torch.full_like(up_scores, -1.0))
    res = upstream.ppo_update(up, ref_policy, tf_adam, q, qm, resp, up_scores, kl_coef=beta_up, update=k,
                              n_updates=n_updates, lr=cfg.optim.lr, temperature=hp.temperature, perms=perms,
                              nminibatches=hp.num_minibatches, gamma=hp.gamma, lam=hp.lam, cliprange=hp.clip_range,
                              cliprange_value=hp.value_clip_range, vf_coef=hp.vf_coef,
                              whiten_rewards=hp.whiten_rewards)
    return up_scores, res


class _RecordingStepper(ppo_core.TorchStepper):
    """``TorchStepper`` that records the lr each optimizer step runs with."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lrs: list[float] = []

    def step(self) -> None:
        if self._seen + 1 >= self.micro_batches:  # this call steps the optimizer
            self.lrs.append(float(self.optimizer.param_groups[0]["lr"]))
        super().step()
