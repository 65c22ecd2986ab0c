"""Reference PPO: one iteration from a given batch of rollouts, written the plain way.

This is the oracle the fast trainer (``rlhf_fast.trainers.ppo``) is held to. It follows "The N
Implementation Details of RLHF with PPO" step by step, with the reference ops, explicit Python
loops and plain ``torch.optim``; one process, no DeepSpeed. It deliberately does not reuse the
loss functions of ``rlhf_fast.algos`` (only its containers and hyper-parameters), so that a
parity test compares two independent implementations of the same formulas.

One iteration::

    make_experience:  old log-probs, reference log-probs, values      (no grad, initial weights)
                      rewards = -beta * kl, + score at the last token ("N details" #17)
                      advantages, returns (GAE + whitening, or grpo / rloo)   once per batch...
    for epoch in range(num_epochs):                                    ("N details" #16)
        perm = randperm(B, generator)                                  fresh every epoch
        for each minibatch:
            (... or here, per minibatch: "N details" #18 / lm-human-preferences)
            zero_grad
            for each micro-batch:  loss = pg + vf_coef * vf - ent_coef * H + kl-in-loss
                                   loss.backward()                     (gradient accumulation)
            optimizer.step()

The losses are normalised by the minibatch's token count (``token-mean``) or row count
(``seq-mean``), so the accumulated gradient is that of the whole minibatch whatever the
micro-batch size.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_fast.algos.hparams import PPOHyperParams
from rlhf_fast.algos.losses import approxkl_per_token
from rlhf_fast.algos.types import MinibatchStats, PPOStats, Rollout, objective_stats
from rlhf_fast.reference import rlmath as ref


@dataclass
class ReferencePPOResult:
    """rollout: the input with logprobs, ref_logprobs, values, kl, rewards, advantages, returns
    filled (advantages / returns of the whole batch, even when ``advantages_per_minibatch``).
    stats: objective statistics and one ``MinibatchStats`` per optimizer step, epoch-major.
    kl_coef: the beta used."""

    rollout: Rollout
    stats: PPOStats
    kl_coef: float


# ---- experience -------------------------------------------------------------------------------


def _forward(policy, critic, batch: Rollout, temperature: float):
    """(logprobs, entropy, values) of the response tokens: (b, R) each; values None when there is
    neither a value head nor a critic."""
    out = policy.logprobs(
        batch.sequences, batch.attention_mask, temperature=temperature, return_entropy=True,
        response_start=batch.response_start,
    )
    values = out.values
    if critic is not None:
        values = critic(batch.sequences, batch.attention_mask, response_start=batch.response_start).values
    return out.logprobs, out.entropy, values


def _scored_in_batches(forward, rollout: Rollout, batches: Optional[list[torch.Tensor]]):
    """``forward(part) -> tuple of (b, R) tensors or None`` over ``rollout``, run on each index set
    of ``batches`` (every row once; the whole batch at once when None) and scattered back."""
    if batches is None:
        return forward(rollout)
    outs = None
    for rows in batches:
        part = forward(rollout.select(rows))
        if outs is None:
            outs = [None if t is None else t.new_zeros((rollout.batch_size, *t.shape[1:])) for t in part]
        for out, t in zip(outs, part):
            if out is not None:
                out[rows] = t
    return tuple(outs)


def first_epoch_micro_batches(generator: torch.Generator, B: int, hp: PPOHyperParams) -> list[torch.Tensor]:
    """The row indices of each micro-batch of the first epoch, in training order, drawn from a copy
    of ``generator`` (its state is not advanced)."""
    g = torch.Generator()
    g.set_state(generator.get_state())
    perm = torch.randperm(B, generator=g)
    mb_size = B // hp.num_minibatches
    micro = hp.micro_batch_size or mb_size
    return [perm[s : s + mb_size][m : m + micro] for s in range(0, B, mb_size) for m in range(0, mb_size, micro)]


@torch.no_grad()
def make_experience(
    policy, ref_policy, rollout: Rollout, hp: PPOHyperParams, *, kl_coef: float, critic=None,
    dtype: torch.dtype = torch.float32, micro_batches: Optional[list[torch.Tensor]] = None,
) -> Rollout:
    """Old / reference log-probs and values from the current (initial) weights, then the shaped
    rewards and, unless ``hp.advantages_per_minibatch``, the advantages and returns.

    ``micro_batches``: row index sets to score the batch in (``first_epoch_micro_batches``). A
    row's log-probs depend on which rows share its forward: CPU / GPU GEMMs pick blocking,
    remainder kernels and thread splits by the row count (with 2 threads and ATen / oneDNN / MKL
    at AVX2, GPT-2's c_attn addmm gives a row of a 4-row batch other float32 bits than the same
    row in a 1-row batch). Scored in the first epoch's micro-batches, the first minibatch's forward
    sees bit-identical inputs and its ratio is exactly 1 at any thread count, micro-batch size or
    CPU ISA (tests/test_ppo_exactness.py), as in rlhf_fast.trainers.ppo_core.score_logprobs. None
    scores the whole batch at once."""
    logprobs, _, values = _scored_in_batches(lambda part: _forward(policy, critic, part, hp.temperature),
                                             rollout, micro_batches)
    ref_logprobs, _, _ = _scored_in_batches(lambda part: _forward(ref_policy, None, part, hp.temperature),
                                            rollout, micro_batches)
    mask = rollout.train_mask  # multi-turn: the model's tokens (docs/architecture.md, "Multi-turn episodes")
    scores = rollout.scores.to(dtype)
    if hp.score_clip is not None:
        scores = scores.clamp(-hp.score_clip, hp.score_clip)
    beta_in_reward = kl_coef if hp.placement.in_reward else 0.0
    rewards, kl = ref.shape_rewards(
        scores, logprobs, ref_logprobs, mask, kl_coef=beta_in_reward, estimator=hp.kl_estimator,
        clamp=hp.kl_clamp, compute_dtype=dtype,
    )
    if rollout.turn_rewards is not None:  # multi-turn: earlier turns' rewards at their turn's last model token
        rewards = rewards + torch.where(mask, rollout.turn_rewards.to(dtype), 0.0)
    if values is not None:
        values = torch.where(mask, values.to(dtype), 0.0)
    out = rollout.replace(
        scores=scores, logprobs=logprobs.to(dtype), ref_logprobs=ref_logprobs.to(dtype), values=values, kl=kl,
        rewards=rewards,
    )
    advantages, returns = compute_advantages(out, hp, dtype)
    return out.replace(advantages=advantages, returns=returns)


def _gae_oracle(batch: Rollout, hp: PPOHyperParams, dtype):
    """GAE with the N-details whitening."""
    mask = batch.train_mask
    if batch.values is None:
        raise ValueError("gae needs values: give the policy a value head or pass a critic")
    rewards = batch.rewards
    if hp.whiten_rewards:  # without the mean shift ("N details" #18)
        rewards = ref.masked_whiten(
            rewards, mask, shift_mean=False, unbiased=hp.whiten_unbiased, eps=hp.whiten_eps, compute_dtype=dtype
        )
    advantages, returns = ref.gae(rewards, batch.values, mask, gamma=hp.gamma, lam=hp.lam, compute_dtype=dtype)
    if hp.whiten_advantages:
        advantages = ref.masked_whiten(
            advantages, mask, shift_mean=True, unbiased=hp.whiten_unbiased, eps=hp.whiten_eps, compute_dtype=dtype
        )
    return advantages, returns


def _grpo_seq(r: torch.Tensor, group_eps: float) -> torch.Tensor:
    """One group's grpo advantages: (r - mean) / (std + eps), unbiased std, 0 for a single row."""
    std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
    return (r - r.mean()) / (std + group_eps)


def _rloo_seq(r: torch.Tensor, group_eps: float) -> torch.Tensor:
    """One group's rloo advantages: r_i - mean of the others, 0 for a single row."""
    n = r.numel()
    return r - (r.sum() - r) / (n - 1) if n > 1 else torch.zeros_like(r)


#: the reference's own per-group formulas, by estimator name
_GROUP_ORACLES = {"grpo": _grpo_seq, "rloo": _rloo_seq}
#: rloo whitens its sequence advantages over the batch (TRL's ``normalize_advantage``); grpo does not
_WHITENS_SEQUENCES = {"grpo": False, "rloo": True}


def _group_oracle(batch: Rollout, hp: PPOHyperParams, dtype):
    """grpo / rloo group baselines written as loops over the groups."""
    mask = batch.train_mask
    seq = group_baseline_advantages((batch.rewards.to(dtype) * mask).sum(-1), batch.group_ids, hp.advantage_estimator)
    if _WHITENS_SEQUENCES[hp.advantage_estimator] and hp.whiten_advantages:
        seq = ref.masked_whiten(
            seq, torch.ones_like(seq, dtype=torch.bool), unbiased=hp.whiten_unbiased, eps=hp.whiten_eps,
            compute_dtype=dtype,
        )
    advantages = seq[:, None] * mask
    return advantages, advantages


def _dr_grpo_seq(r: torch.Tensor, group_eps: float) -> torch.Tensor:
    """One group's Dr. GRPO advantages: r - mean (no std division)."""
    return r - r.mean()


_GROUP_ORACLES["dr_grpo"] = _dr_grpo_seq
_WHITENS_SEQUENCES["dr_grpo"] = False


def _returns_loop(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over each row's valid tokens, one Python loop per row."""
    out = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        running = torch.zeros((), dtype=rewards.dtype)
        for t in reversed(range(rewards.shape[1])):
            if bool(mask[i, t]):
                running = rewards[i, t] + gamma * running
                out[i, t] = running
    return out


#: reinforce_pp_baseline subtracts the group's mean sequence reward; reinforce_pp does not
_SUBTRACTS_GROUP_MEAN = {"reinforce_pp": False, "reinforce_pp_baseline": True}


def _reinforce_oracle(batch: Rollout, hp: PPOHyperParams, dtype):
    """REINFORCE++ (OpenRLHF ``reinforce``) and its group-mean baseline (``reinforce_baseline``):
    rewards (minus the group's mean sequence reward at each row's last token for the baseline)
    -> returns -> whitening over every valid token of the batch."""
    mask = batch.train_mask
    rewards = (batch.rewards.to(dtype) * mask).clone()
    if _SUBTRACTS_GROUP_MEAN[hp.advantage_estimator]:
        means = group_baseline_advantages(rewards.sum(-1), batch.group_ids, "dr_grpo")  # r - mean per group
        for i in range(rewards.shape[0]):
            valid = mask[i].nonzero().flatten()
            if valid.numel():
                last = int(valid[-1])
                rewards[i, last] = rewards[i, last] - (rewards[i].sum() - means[i])
    returns = _returns_loop(rewards, mask, hp.gamma)
    advantages = returns
    if hp.whiten_advantages:
        advantages = ref.masked_whiten(returns, mask, shift_mean=True, unbiased=hp.whiten_unbiased, eps=hp.whiten_eps,
                                       compute_dtype=dtype) * mask
    return advantages, returns


_ADVANTAGE_ORACLES = {
    "gae": _gae_oracle, "grpo": _group_oracle, "rloo": _group_oracle, "dr_grpo": _group_oracle,
    "reinforce_pp": _reinforce_oracle, "reinforce_pp_baseline": _reinforce_oracle,
}


def compute_advantages(batch: Rollout, hp: PPOHyperParams, dtype: torch.dtype = torch.float32):
    """(advantages, returns) of ``batch`` with the reference ops: GAE with the N-details
    whitening, or the grpo / rloo group baselines written as loops over the groups."""
    oracle = _ADVANTAGE_ORACLES.get(hp.advantage_estimator)
    if oracle is None:
        raise NotImplementedError(f"the reference PPO has no advantage estimator {hp.advantage_estimator!r}")
    return oracle(batch, hp, dtype)


def group_baseline_advantages(
    seq_rewards: torch.Tensor, group_ids: Optional[torch.Tensor], estimator: str, *, group_eps: float = 1e-6
) -> torch.Tensor:
    """(B,) sequence advantages with a loop over groups: grpo ``(r - mean) / (std + eps)``
    (unbiased std, 0 for a single row), rloo ``r_i - mean of the others`` (0 for a single row)."""
    if group_ids is None:
        raise ValueError(f"{estimator} needs rollout.group_ids")
    rows = defaultdict(list)
    for i, g in enumerate(group_ids.tolist()):
        rows[g].append(i)
    adv = torch.zeros_like(seq_rewards)
    for idx in rows.values():
        adv[idx] = _GROUP_ORACLES[estimator](seq_rewards[idx], group_eps)
    return adv


# ---- losses (written out, independent of rlhf_fast.algos.losses) -------------------------------


_AGGREGATE_ORACLES = {
    "token-mean": lambda x, mask: (x * mask).sum(),
    "seq-mean": lambda x, mask: ((x * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum(),
    "seq-mean-token-sum-norm": lambda x, mask: (x * mask).sum(),  # Dr. GRPO: / (rows x R), a constant
}
#: the minibatch normaliser: its token count, its row count, or rows x the padded length (Dr. GRPO)
_NORMALIZER_ORACLES = {
    "token-mean": lambda mask, dtype: mask.sum().clamp(min=1).to(dtype),
    "seq-mean": lambda mask, dtype: torch.tensor(float(mask.shape[0]), dtype=dtype),
    "seq-mean-token-sum-norm": lambda mask, dtype: torch.tensor(float(mask.shape[0] * mask.shape[1]), dtype=dtype),
}


def _aggregate(x, mask, mode: str, normalizer):
    """Sum over the micro-batch, divided by the minibatch's token or row count."""
    if mode not in _AGGREGATE_ORACLES:
        raise NotImplementedError(f"the reference PPO has no loss aggregation {mode!r}")
    return _AGGREGATE_ORACLES[mode](x, mask) / normalizer


def policy_loss_per_token(logprobs, old_logprobs, advantages, hp: PPOHyperParams, mask=None):
    """(per-token clipped surrogate, ratio, where the clipped term is active, where the dual clip
    capped the loss). ``mask``: the response mask (needed by sequence-level losses: gspo)."""
    if hp.policy_loss not in _POLICY_LOSS_ORACLES:
        raise NotImplementedError(f"the reference PPO has no policy loss {hp.policy_loss!r}")
    if hp.policy_loss in _NEEDS_MASK:
        return _POLICY_LOSS_ORACLES[hp.policy_loss](logprobs, old_logprobs, advantages, hp, mask=mask)
    return _POLICY_LOSS_ORACLES[hp.policy_loss](logprobs, old_logprobs, advantages, hp)


def _vanilla_pg_oracle(logprobs, old_logprobs, advantages, hp: PPOHyperParams):
    ratio = torch.exp(logprobs - old_logprobs)
    never = torch.zeros_like(ratio, dtype=torch.bool)
    return -advantages * ratio, ratio, never, never


def _ppo_clip_oracle(logprobs, old_logprobs, advantages, hp: PPOHyperParams):
    ratio = torch.exp(logprobs - old_logprobs)
    never = torch.zeros_like(ratio, dtype=torch.bool)
    high = hp.clip_range if hp.clip_range_high is None else hp.clip_range_high
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - hp.clip_range, 1.0 + high)
    pg = torch.max(pg_losses, pg_losses2)
    dual = never
    if hp.dual_clip is not None:  # cap the loss of negative advantages at -A * c
        dual = (advantages < 0) & (-advantages * hp.dual_clip < pg)
        pg = torch.where(advantages < 0, torch.min(pg, -advantages * hp.dual_clip), pg)
    return pg, ratio, pg_losses2 > pg_losses, dual


def _gspo_oracle(logprobs, old_logprobs, advantages, hp: PPOHyperParams, mask=None):
    """GSPO: the clipped surrogate on the sequence ratio exp(mean of the valid log-ratios), with
    the GSPO-token gradient (each token's logp carries the sequence ratio)."""
    if mask is None:
        raise ValueError("gspo needs the response mask (the sequence ratio is a mean over valid tokens)")
    rows = []
    for i in range(logprobs.shape[0]):
        valid = mask[i].bool()
        d = logprobs[i] - old_logprobs[i]
        seq = d[valid].mean() if bool(valid.any()) else torch.zeros((), dtype=d.dtype)
        rows.append(torch.exp(seq.detach() + logprobs[i] - logprobs[i].detach()))
    ratio = torch.stack(rows)
    high = hp.clip_range if hp.clip_range_high is None else hp.clip_range_high
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - hp.clip_range, 1.0 + high)
    never = torch.zeros_like(ratio, dtype=torch.bool)
    return torch.max(pg_losses, pg_losses2), ratio, pg_losses2 > pg_losses, never


_POLICY_LOSS_ORACLES = {"ppo_clip": _ppo_clip_oracle, "vanilla_pg": _vanilla_pg_oracle, "gspo": _gspo_oracle}
#: the losses whose per-token value depends on the whole row's mask
_NEEDS_MASK = {"gspo"}


def value_loss_per_token(values, old_values, returns, hp: PPOHyperParams):
    """(per-token 0.5 * max(unclipped, clipped) squared error (baselines ppo2), unclipped error,
    where the clipped error is the larger)."""
    vf_losses1 = (values - returns) ** 2
    if hp.value_clip_range is None:
        return 0.5 * vf_losses1, vf_losses1, torch.zeros_like(vf_losses1, dtype=torch.bool)
    vpredclipped = old_values + torch.clamp(values - old_values, -hp.value_clip_range, hp.value_clip_range)
    vf_losses2 = (vpredclipped - returns) ** 2
    # clipped: the clamp is active and the clipped error is the larger (old + (v - old) may round
    # away from v inside the range: that is not clipping)
    active = (values - old_values).abs() > hp.value_clip_range
    return 0.5 * torch.max(vf_losses1, vf_losses2), vf_losses1, active & (vf_losses2 > vf_losses1)


# ---- the update -------------------------------------------------------------------------------


def _minibatch_loss(policy, critic, micro: Rollout, hp: PPOHyperParams, kl_coef: float, normalizer, dtype):
    """Loss of one micro-batch (a share of the minibatch loss) and the per-token pieces for stats."""
    mask = micro.train_mask
    fmask = mask.to(dtype)
    logprobs, entropy, values = _forward(policy, critic, micro, hp.temperature)
    logprobs, entropy = logprobs.to(dtype), entropy.to(dtype)

    pg, ratio, clipped, dual = policy_loss_per_token(logprobs, micro.logprobs, micro.advantages, hp, mask=mask)
    pg_loss = _aggregate(pg, fmask, hp.loss_aggregation, normalizer)
    loss = pg_loss
    # the log of the ratio the loss used: per token, or the sequence's for sequence-level losses (gspo)
    logr = torch.log(ratio).detach() if hp.policy_loss in _NEEDS_MASK else (logprobs - micro.logprobs).detach()
    pieces = dict(mask=mask, logr=logr, ratio=ratio.detach(), clipped=clipped,
                  dual_clipped=dual, entropy=entropy.detach())

    vf_loss = torch.zeros((), dtype=dtype)
    if hp.estimator.needs_values:
        values = values.to(dtype)
        vf, verror, vclipped = value_loss_per_token(values, micro.values, micro.returns, hp)
        vf_loss = _aggregate(vf, fmask, hp.loss_aggregation, normalizer)
        loss = loss + hp.vf_coef * vf_loss
        pieces.update(vpred=values.detach(), verror=verror.detach(), vclipped=vclipped)

    if hp.ent_coef != 0.0:
        loss = loss - hp.ent_coef * _aggregate(entropy, fmask, hp.loss_aggregation, normalizer)

    kl_part = torch.zeros((), dtype=dtype)
    if hp.placement.in_loss:
        kl = ref.kl_penalty(logprobs, micro.ref_logprobs, estimator=hp.kl_estimator, clamp=hp.kl_clamp, compute_dtype=dtype)
        kl_part = _aggregate(kl, fmask, hp.loss_aggregation, normalizer)
        loss = loss + kl_coef * kl_part
    parts = dict(loss=loss.detach(), policy_loss=pg_loss.detach(), value_loss=vf_loss.detach(), kl_loss=kl_part.detach())
    return loss, parts, pieces


def _stats(parts: list[dict], pieces: list[dict]) -> MinibatchStats:
    """Minibatch statistics: losses summed over micro-batches (each is already a share of the
    minibatch loss), token means over all of the minibatch's valid tokens."""
    cat = {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}
    m = cat["mask"]

    def mean(x):
        return x[m].double().mean() if bool(m.any()) else torch.zeros((), dtype=torch.float64)

    s = MinibatchStats(**{k: sum(p[k] for p in parts) for k in parts[0]})
    s.approxkl = mean(approxkl_per_token(cat["logr"]))
    s.clipfrac = mean(cat["clipped"].double())
    s.dual_clipfrac = mean(cat["dual_clipped"].double())
    s.entropy = mean(cat["entropy"])
    s.ratio_mean = mean(cat["ratio"])
    s.ratio_max = cat["ratio"][m].max().double() if bool(m.any()) else torch.zeros((), dtype=torch.float64)
    if "vpred" in cat:
        s.vf_clipfrac = mean(cat["vclipped"].double())
        s.vpred = mean(cat["vpred"])
        s.verror = mean(cat["verror"])
    return s


def _minibatch_step(policy, critic, minibatch: Rollout, hp: PPOHyperParams, kl_coef: float, optimizers, dtype, *,
                    micro_size: int) -> MinibatchStats:
    """One optimizer step on ``minibatch``: gradients accumulated over its micro-batches, each
    optimizer's parameters clipped by their global norm, then stepped."""
    if hp.advantages_per_minibatch:  # lm-human-preferences: whitening + GAE inside loss()
        adv, ret = compute_advantages(minibatch, hp, dtype)
        minibatch = minibatch.replace(advantages=adv, returns=ret)
    normalizer = _NORMALIZER_ORACLES[hp.loss_aggregation](minibatch.train_mask, dtype)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    parts, pieces = [], []
    mb_size = minibatch.batch_size
    for m0 in range(0, mb_size, micro_size):
        micro = minibatch.select(torch.arange(m0, min(m0 + micro_size, mb_size)))
        loss, p, pc = _minibatch_loss(policy, critic, micro, hp, kl_coef, normalizer, dtype)
        loss.backward()
        parts.append(p)
        pieces.append(pc)
    for opt in optimizers:
        if hp.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], hp.max_grad_norm)
        opt.step()
    return _stats(parts, pieces)


def ppo_iteration(
    policy,
    ref_policy,
    rollout: Rollout,
    hp: PPOHyperParams,
    optimizer: torch.optim.Optimizer,
    *,
    kl_coef: float,
    generator: torch.Generator,
    critic=None,
    critic_optimizer: Optional[torch.optim.Optimizer] = None,
    dtype: torch.dtype = torch.float32,
) -> ReferencePPOResult:
    """One PPO iteration on ``rollout`` (query / response ids and masks, scores; group_ids for
    grpo / rloo), leaving ``policy`` (and ``critic``) updated.

    policy: ``rlhf_fast.models.Policy`` (with a value head unless ``critic`` is given or the
        estimator needs no values). ref_policy: the frozen reference ``Policy``; for a policy with
        LoRA adapters, ``rlhf_fast.models.lora.AdaptersOff(policy)``, the policy itself with its
        adapters disabled (read before the first update, as the trainer does).
    optimizer: a plain ``torch.optim`` optimizer over the trained parameters (policy and critic
        together, as TRL's PolicyAndValueWrapper, clipped by one global norm). critic_optimizer:
        the critic's own optimizer instead (OpenRLHF, DeepSpeed-Chat and rlhf_fast's trainer: one
        engine each), so policy and critic gradients are clipped separately. kl_coef: this iteration's beta (the caller owns
        the KL controller and updates it from ``result.stats.objective.kl``).
    generator: draws the per-epoch permutations ("N details" #16). dtype: the RL math's dtype
        (float64 for an oracle run; models keep their own dtype).
    Dropout should be off (models from ``rlhf_fast.models`` load that way, "N details" #13): then
    the ratio is exactly 1 on the first minibatch of the first epoch.
    """
    B = rollout.batch_size
    if B % hp.num_minibatches:
        raise ValueError(f"batch size {B} is not divisible by num_minibatches {hp.num_minibatches}")
    mb_size = B // hp.num_minibatches
    micro_size = hp.micro_batch_size or mb_size
    optimizers = [optimizer] + ([critic_optimizer] if critic_optimizer is not None else [])

    experience = make_experience(policy, ref_policy, rollout, hp, kl_coef=kl_coef, critic=critic, dtype=dtype,
                                 micro_batches=first_epoch_micro_batches(generator, B, hp))
    minibatch_stats: list[MinibatchStats] = []
    for _epoch in range(hp.num_epochs):
        perm = torch.randperm(B, generator=generator)
        for start in range(0, B, mb_size):
            minibatch = experience.select(perm[start : start + mb_size])
            minibatch_stats.append(_minibatch_step(policy, critic, minibatch, hp, kl_coef, optimizers, dtype,
                                                   micro_size=micro_size))

    stats = PPOStats(objective=objective_stats(experience, kl_coef), minibatches=minibatch_stats)
    return ReferencePPOResult(rollout=experience, stats=stats, kl_coef=float(kl_coef))
