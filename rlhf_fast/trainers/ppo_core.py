"""The fast PPO iteration below the trainer: the steppers, the minibatch layout, the experience and
the update loop, independent of how optimizers step.

- steppers: optimizer stepping goes through a ``Stepper``: ``TorchStepper`` (a module and a
  ``torch.optim`` optimizer, as the reference) or ``DeepSpeedStepper`` (a DeepSpeed engine, ZeRO
  0-3), so the same loop runs in the parity tests and in the trainer;
- the minibatch layout: ``epoch_plan`` / ``first_epoch_plan`` (``MinibatchPlan``,
  ``MinibatchLayout``): which rows each rank trains on in each minibatch and micro-batch;
- the experience: ``gather_rollout`` (every rank holds the global batch), ``score_logprobs`` (old
  and reference log-probs, values, in the first epoch's micro-batches) and ``finish_experience``
  (rewards, KL, advantages and returns);
- the update loop: ``ppo_update`` (``num_epochs`` x ``num_minibatches`` optimizer steps, one
  ``MinibatchStats`` per step).

Together they are what ``rlhf_fast.trainers.parity.ppo_reference.ppo_iteration`` does, computed with the
fused ops (``rlhf_fast.ops``: log-probs straight into float32, one-launch GAE and whitening) and
the loss registries of ``rlhf_fast.algos``; the parity tests hold the two to each other.

Data parallelism. The experience of all ranks is gathered (token ids and a few floats per token:
small), so every rank holds the global batch, computes the same advantages (whitening over the
global batch) and draws the same permutation. Rank r trains on rows ``r::world`` of each global
minibatch, and every loss is divided by the global minibatch's token (row) count and multiplied
by the world size (DeepSpeed averages gradients over ranks): the update equals the one-process
update on the global batch, for any number of minibatches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.distributed as dist

from rlhf_fast import algos
from rlhf_fast.algos import MinibatchStats, PPOHyperParams, Rollout
from rlhf_fast.models.policy import response_slice
from rlhf_fast.trainers.ppo_trim import pad_response, trim_padding
from rlhf_fast.trainers.token_budget import token_budget_micro


class Stepper(Protocol):
    """What the update loop needs from a trained module and its optimizer."""

    module: torch.nn.Module

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None:
        """Called after every micro-batch; the optimizer steps at the minibatch boundary."""

    def set_micro_batches(self, n: int) -> None:
        """The next minibatch has ``n`` micro-batches (token-budget plans: trainers/token_budget.py)."""


class TorchStepper:
    """A module and a plain optimizer; the optimizer steps after ``micro_batches`` backward calls
    (set by the update loop per minibatch), with optional global-norm clipping."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, max_grad_norm: Optional[float] = None,
                 scheduler=None):
        self.module, self.optimizer, self.max_grad_norm, self.scheduler = module, optimizer, max_grad_norm, scheduler
        self.micro_batches, self._seen = 1, 0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._seen = 0

    def set_micro_batches(self, n: int) -> None:
        self.micro_batches = n

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self._seen += 1
        if self._seen < self.micro_batches:
            return
        if self.max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()


class DeepSpeedStepper:
    """A DeepSpeed engine: its ``gradient_accumulation_steps`` must equal the micro-batches per
    rank per minibatch (the trainer builds it so). Losses arrive already normalised by the global
    minibatch, so DeepSpeed must not divide them by the accumulation steps again."""

    def __init__(self, engine):
        self.engine = engine
        self.module = engine.module
        self.micro_batches = engine.gradient_accumulation_steps()
        self._manual, self._seen = False, 0

    def zero_grad(self) -> None:
        self._seen = 0  # DeepSpeed zeroes gradients after each optimizer step

    def set_micro_batches(self, n: int) -> None:
        """A count other than the engine's accumulation steps: the boundary is set by hand before
        each backward (DeepSpeed's ``set_gradient_accumulation_boundary``)."""
        self.micro_batches, self._manual = n, True

    def backward(self, loss: torch.Tensor) -> None:
        if self._manual:
            self.engine.set_gradient_accumulation_boundary(self._seen + 1 == self.micro_batches)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self._seen += 1
        self.engine.step()


# ---- experience -------------------------------------------------------------------------------


def _trim(batch: Rollout, hp: PPOHyperParams) -> Rollout:
    """``batch`` on the columns its rows attend to (``hp.trim_padding``), plus the columns the
    score position needs past the stop (its values)."""
    return trim_padding(batch, extra=hp.score_place.extra_columns) if hp.trim_padding else batch


def policy_forward(policy, critic, batch: Rollout, hp: PPOHyperParams, *, entropy: bool = False):
    """(logprobs, entropy or None, values or None), each (b, R), of the response tokens, under the
    distribution the sampler draws from (``hp.temperature``, ``hp.logprob_filter()``). With
    ``hp.trim_padding`` the models run on the columns the rows attend to (trainers/ppo_trim.py)."""
    R = batch.response_ids.shape[1]
    batch = _trim(batch, hp)
    out = policy.logprobs(batch.sequences, batch.attention_mask, temperature=hp.temperature, return_entropy=entropy,
                          response_start=batch.response_start, **hp.logprob_filter())
    values = out.values
    if critic is not None:
        values = critic(batch.sequences, batch.attention_mask, response_start=batch.response_start).values
    return pad_response(out.logprobs, R), pad_response(out.entropy, R), pad_response(values, R)


def values_only(policy, critic, batch: Rollout, hp: PPOHyperParams):
    """(b, R) values (None without a value head or critic), skipping the LM head: what the
    experience needs when the old log-probs come from the rollout."""
    R = batch.response_ids.shape[1]
    batch = _trim(batch, hp)
    if critic is not None:
        return pad_response(critic(batch.sequences, batch.attention_mask, response_start=batch.response_start).values, R)
    if getattr(policy, "value_head", None) is None:
        return None
    values = policy.forward(batch.sequences, batch.attention_mask).values  # (b, Q + R)
    return pad_response(response_slice(values, batch.response_start), R)


def ref_forward(ref_policy, batch: Rollout, hp: PPOHyperParams) -> torch.Tensor:
    """(b, R) float32 reference log-probs (under its filter only with ``hp.ref_filter``)."""
    R = batch.response_ids.shape[1]
    batch = _trim(batch, hp)
    ref = ref_policy.logprobs(batch.sequences, batch.attention_mask, temperature=hp.temperature,
                              response_start=batch.response_start, **hp.logprob_filter(reference=True)).logprobs
    return pad_response(ref.float(), R)


@dataclass
class _World:
    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "_World":
        if dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()


@dataclass
class MinibatchPlan:
    """rows: (mb,) global row indices of one minibatch, in permutation order. micro: this rank's
    micro-batches as positions into ``rows`` (rank r takes positions r::world, then chunks)."""

    rows: torch.Tensor
    micro: list[torch.Tensor]


@dataclass(frozen=True)
class MinibatchLayout:
    """How a global batch of B rows splits (the one place this is computed: the trainer builds its
    DeepSpeed engines from it, the update loop cuts its minibatches with it).

    minibatch: rows per minibatch (B / num_minibatches); per_rank: this rank's rows of one
    minibatch (minibatch / world); micro: rows per micro-batch; micro_batches: micro-batches per
    rank per minibatch, the optimizer's gradient-accumulation steps."""

    minibatch: int
    per_rank: int
    micro: int
    micro_batches: int

    @classmethod
    def of(cls, B: int, hp: PPOHyperParams, world_size: int) -> "MinibatchLayout":
        if B % hp.num_minibatches:
            raise ValueError(f"rollout batch {B} is not divisible by num_minibatches {hp.num_minibatches}")
        mb = B // hp.num_minibatches
        if mb % world_size:
            raise ValueError(f"minibatch size {mb} is not divisible by the world size {world_size}")
        if hp.loss_group_rows and mb % hp.loss_group_rows:
            raise ValueError(f"algo.loss_group_rows {hp.loss_group_rows} must divide the minibatch ({mb} rows = "
                             f"rollout batch {B} / num_minibatches {hp.num_minibatches}): the loss is a mean over "
                             "groups of that many rows")
        per_rank = mb // world_size
        micro = min(hp.micro_batch_size or per_rank, per_rank)
        return cls(minibatch=mb, per_rank=per_rank, micro=micro, micro_batches=-(-per_rank // micro))


def epoch_plan(perm: torch.Tensor, hp: PPOHyperParams, world: "_World", tokens=None) -> list[MinibatchPlan]:
    """The minibatches and this rank's micro-batches of one epoch, from its permutation.
    ``tokens`` (B,): each row's valid tokens, for ``hp.max_tokens_per_micro_batch`` plans."""
    layout = MinibatchLayout.of(perm.numel(), hp, world.size)
    mine = torch.arange(world.rank, layout.minibatch, world.size, device=perm.device)  # (per_rank,)
    chunks = list(mine.split(layout.micro))
    plans = [MinibatchPlan(perm[s : s + layout.minibatch], chunks) for s in range(0, perm.numel(), layout.minibatch)]
    if hp.max_tokens_per_micro_batch:  # cut by tokens (trainers/token_budget.py); a host sync per epoch
        if tokens is None:
            raise ValueError("algo.max_tokens_per_micro_batch: the plan needs each row's token count "
                             "(tokens=row_tokens(rollout))")
        counts = tokens.tolist()
        for p in plans:
            p.micro = token_budget_micro(p.rows, counts, hp.max_tokens_per_micro_batch, world.rank, world.size)
    return plans


def row_tokens(batch: Rollout) -> torch.Tensor:
    """(B,) valid tokens (query + response) of each row: what a token-budget plan cuts by."""
    return batch.query_mask.sum(-1) + batch.response_mask.sum(-1)


def first_epoch_plan(generator: torch.Generator, B: int, hp: PPOHyperParams, device=None,
                     tokens=None) -> list[MinibatchPlan]:
    """The plan ``ppo_update`` will draw for its first epoch, without advancing ``generator``."""
    g = torch.Generator()
    g.set_state(generator.get_state())
    return epoch_plan(torch.randperm(B, generator=g).to(device), hp, _World.current(), tokens)


@torch.no_grad()
def score_logprobs(policy, critic, ref_policy, rollout: Rollout, hp: PPOHyperParams, *, plan: list[MinibatchPlan],
                   old_logprobs: Optional[torch.Tensor] = None):
    """Old log-probs and values (current weights) and reference log-probs of every row of the
    global batch: (B, R) float32 each (values None without value head or critic).

    Each rank scores exactly the micro-batches it will train on first (``plan`` = the first
    epoch's), with the same rows in the same order: the first minibatch's forward then sees
    bit-identical inputs, so its ratio is exactly 1 (TRL #454) however CPU / GPU matmuls depend
    on the batch shape. The rows of other ranks arrive through one all-reduce (sum of zeros).
    ``old_logprobs`` (B, R): the engine's (``ppo.old_logprobs: rollout``); the policy's LM head
    is then skipped (its backbone still runs when a value head gives the values)."""
    B, R = rollout.response_ids.shape
    dev = rollout.response_ids.device
    lp, ref = torch.zeros(B, R, device=dev), torch.zeros(B, R, device=dev)
    values = None
    for mb in plan:
        for pos in mb.micro:
            rows = mb.rows[pos]
            part = rollout.select(rows)
            if old_logprobs is None:
                l, _, v = policy_forward(policy, critic, part, hp)
                lp[rows] = l.float()
            else:
                v = values_only(policy, critic, part, hp)
            ref[rows] = ref_forward(ref_policy, part, hp)
            if v is not None:
                values = torch.zeros(B, R, device=dev) if values is None else values
                values[rows] = v.float()
    lp, ref, values = _sum_over_ranks(lp, ref, values)
    if old_logprobs is not None:
        lp = old_logprobs.float()
    if hp.ref_filter:
        _check_reference_support(ref, rollout.train_mask)
    return lp, ref, values


def _sum_over_ranks(lp, ref, values):
    """Each rank filled its own rows (zeros elsewhere): one all-reduce joins them."""
    world = _World.current()
    if world.size == 1:
        return lp, ref, values
    has_values = torch.tensor([0.0 if values is None else 1.0], device=lp.device)
    dist.all_reduce(has_values)
    stacked = torch.stack([lp, ref, values if values is not None else torch.zeros_like(lp)])
    dist.all_reduce(stacked)
    return stacked[0], stacked[1], (stacked[2] if has_values.item() > 0 else None)


def _check_reference_support(ref: torch.Tensor, mask: torch.Tensor) -> None:
    """With ``algo.ref_filter`` a sampled token outside the reference's top-k / top-p set has
    reference log-prob -inf: an infinite KL. Stop with an error that says so (a host sync)."""
    outside = mask & torch.isneginf(ref)
    n = int(outside.sum())
    if n:
        raise ValueError(f"{n} of {int(mask.sum())} sampled tokens lie outside the reference policy's top-k / top-p "
                         "set (reference log-prob -inf, an infinite KL): set ppo.algo.ref_filter false to take the "
                         "reference log-probs under its full distribution")


def finish_experience(rollout: Rollout, hp: PPOHyperParams, *, kl_coef: float,
                      score_stats: Optional[algos.RunningMoments] = None) -> Rollout:
    """Rollout with logprobs / ref_logprobs (/ values) filled -> scores normalised (with
    ``hp.normalize_scores``: ``score_stats`` is updated with this global batch, then applied) and
    clipped, rewards and KL shaped, advantages and returns (unless ``hp.advantages_per_minibatch``:
    then per minibatch)."""
    mask = rollout.train_mask  # the model's tokens (multi-turn: environment tokens are not actions)
    scores = rollout.scores.float()
    if hp.normalize_scores:
        if score_stats is None:
            raise ValueError("algo.normalize_scores needs the trainer's running score statistics (score_stats)")
        score_stats.update(scores)
        scores = score_stats.normalize(scores, shift_mean=hp.score_norm_shift_mean, unbiased=hp.score_norm_unbiased)
    if hp.score_clip is not None:
        scores = scores.clamp(-hp.score_clip, hp.score_clip)
    vmask = hp.score_place.value_mask(mask)  # (B, R) bool: where the score and the values live
    at_stop = vmask is mask
    rewards, kl = algos.compute_rewards(scores if at_stop else torch.zeros_like(scores), rollout.logprobs,
                                        rollout.ref_logprobs, mask, kl_coef=kl_coef, placement=hp.kl_placement,
                                        estimator=hp.kl_estimator, clamp=hp.kl_clamp)
    if not at_stop:  # the score on the last token of the value mask, the KL on the trained tokens only
        last = algos.last_true_index(vmask)  # (B,)
        rewards = rewards + torch.where(torch.arange(mask.shape[1], device=mask.device) == last[:, None],
                                        scores[:, None].to(rewards.dtype), 0.0)
    if rollout.turn_rewards is not None:  # multi-turn: each earlier turn's reward at its last model token
        rewards = rewards + torch.where(mask, rollout.turn_rewards.float(), 0.0)  # (B, R)
    values = None if rollout.values is None else torch.where(vmask, rollout.values, 0.0)
    out = rollout.replace(scores=scores, values=values, kl=kl, rewards=rewards)
    adv, ret = advantages_of(out, hp)
    return out.replace(advantages=adv, returns=ret)


def advantages_of(batch: Rollout, hp: PPOHyperParams):
    mask = batch.train_mask  # the model's tokens (multi-turn: environment tokens are not actions)
    vmask = hp.score_place.value_mask(mask)
    inp = algos.AdvantageInput(rewards=batch.rewards, mask=mask, values=batch.values,
                               group_ids=batch.group_ids, value_mask=None if vmask is mask else vmask)
    return algos.compute_advantages(hp.advantage_estimator, inp, hp.advantage_params())


def gather_rollout(rollout: Rollout, *, pad_token_id: int = 0) -> Rollout:
    """The rollouts of all ranks concatenated in rank order (every rank gets the same global
    batch). Responses must share R on every rank (the trainer pads to max_new_tokens); prompts
    are left-padded to the widest rank's width first."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return rollout
    world = dist.get_world_size()
    width = torch.tensor([rollout.query_ids.shape[1]], device=rollout.query_ids.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    extra = int(width) - rollout.query_ids.shape[1]
    if extra:
        pad = torch.nn.functional.pad
        rollout = rollout.replace(query_ids=pad(rollout.query_ids, (extra, 0), value=pad_token_id),
                                  query_mask=pad(rollout.query_mask, (extra, 0), value=False))

    def gather(t: torch.Tensor) -> torch.Tensor:
        src = t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()
        parts = [torch.empty_like(src) for _ in range(world)]
        dist.all_gather(parts, src)
        cat = torch.cat(parts)
        return cat.bool() if t.dtype == torch.bool else cat

    return rollout.map(gather)


# ---- update -----------------------------------------------------------------------------------


def _micro_loss(policy_st: Stepper, critic_st: Optional[Stepper], micro: Rollout, hp: PPOHyperParams, kl_coef: float,
                norms: "_Normalizers", scale: float):
    """Backward of one micro-batch's share of the minibatch loss; returns the detached loss parts
    and the per-token statistics the loss functions computed (for ``_minibatch_stats``)."""
    mask = micro.train_mask  # (b, R) bool: the model's tokens (multi-turn: environment tokens attended, not trained)
    normalizer = norms.policy
    critic = critic_st.module if critic_st is not None else None
    # policy/entropy is always reported; the op computes it in the same pass
    logprobs, entropy, values = policy_forward(policy_st.module, critic, micro, hp, entropy=True)  # (b, R)
    # a stale batch (asynchronous rollouts): the decoupled objective, w * A with w = pi_prox / pi_behav
    adv = algos.decoupled_advantages(micro.advantages, micro.is_weights)  # (b, R); the advantages when None
    pg = algos.policy_loss(hp.policy_loss, logprobs, micro.logprobs, adv, mask, hp.policy_loss_params(),
                           normalizer=normalizer)
    loss = pg.loss
    kl_part = torch.zeros((), device=logprobs.device)
    if hp.placement.in_loss:  # over the tokens still in the policy's filtered support (see _minibatch_stats)
        in_support = mask & torch.isfinite(logprobs.detach()) if hp.filters_logprobs else mask
        term, kl_part = algos.kl_loss(logprobs, micro.ref_logprobs, in_support, coef=hp.placement.loss_coef(kl_coef),
                                      estimator=hp.kl_estimator, clamp=hp.kl_clamp, aggregation=hp.loss_aggregation,
                                      normalizer=normalizer)
        loss = loss + term
    if hp.ent_coef != 0.0:
        loss = loss + algos.entropy_bonus(entropy, mask, coef=hp.ent_coef, aggregation=hp.loss_aggregation,
                                          normalizer=normalizer)
    vf = None
    if hp.estimator.needs_values:
        vf = algos.clipped_value_loss(values, micro.values, micro.returns, norms.value_mask, clip_range=hp.value_clip_range,
                                      aggregation=hp.loss_aggregation, normalizer=norms.value)
    _backward(policy_st, critic_st, loss, vf, hp.vf_coef, scale)
    value_loss = vf.loss.detach() if vf is not None else torch.zeros((), device=loss.device)
    parts = dict(loss=(loss.detach() + hp.vf_coef * value_loss), policy_loss=pg.loss.detach(), value_loss=value_loss,
                 kl_loss=kl_part.detach())
    pieces = dict(mask=mask, logr=pg.logr, entropy=entropy.detach(), clipped=pg.clipped, dual_clipped=pg.dual_clipped)
    if vf is not None:  # the value statistics over the trained tokens, as the others
        pieces.update(vpred=torch.where(mask, vf.values, 0.0), verror=torch.where(mask, vf.sq_error, 0.0),
                      vclipped=vf.clipped & mask)
    return parts, pieces


def _backward(policy_st: Stepper, critic_st: Optional[Stepper], loss, vf, vf_coef: float, scale: float) -> None:
    """Back-propagates ``loss + vf_coef * value loss``: one backward through a shared model (value
    head), or one per engine with a separate critic (disjoint parameters: the gradients of the sum)."""
    if critic_st is None:
        total = loss + (vf_coef * vf.loss if vf is not None else 0.0)
        policy_st.backward(total * scale)
    else:
        policy_st.backward(loss * scale)
        critic_st.backward(vf_coef * vf.loss * scale)


def _minibatch_stats(parts: list[dict], pieces: list[dict], world: _World) -> MinibatchStats:
    """Losses summed over this rank's micro-batches and over ranks; token statistics over every
    valid token of the global minibatch (sums and counts all-reduced in one collective)."""
    m = torch.cat([p["mask"] for p in pieces])
    cat = {k: torch.cat([p[k] for p in pieces]).double() for k in pieces[0] if k != "mask"}
    logr = cat.pop("logr")
    # Under a top-k / top-p filter a sampled token can leave the updated policy's kept set: its new
    # log-prob is -inf (ratio 0, which the clipped loss handles). The ratio statistics cover the
    # tokens still in the set; the others are counted apart (policy/outside_filter_frac).
    kept = m & torch.isfinite(logr)
    sums = {k: torch.where(m, v, 0.0).sum() for k, v in cat.items()}
    sums["approxkl"] = torch.where(kept, algos.approxkl_per_token(logr), 0.0).sum()
    sums["ratio"] = torch.where(kept, torch.exp(logr), 0.0).sum()
    sums["outside"] = (m & ~kept).sum().double()
    losses = {k: sum(p[k].double() for p in parts) for k in parts[0]}
    ratio_max = torch.where(kept, torch.exp(logr), -torch.inf).max() if kept.any() else torch.zeros((), dtype=torch.float64)
    keys = sorted(sums)
    vec = torch.stack([m.sum().double(), kept.sum().double()] + [sums[k] for k in keys]
                      + [losses[k] for k in sorted(losses)])
    if world.size > 1:
        dist.all_reduce(vec)
        mx = ratio_max.reshape(1).clone()
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        ratio_max = mx[0]
    n, n_kept = vec[0].clamp(min=1), vec[1].clamp(min=1)
    s = dict(zip(keys, vec[2 : 2 + len(keys)]))
    lo = dict(zip(sorted(losses), vec[2 + len(keys):]))  # each rank's parts are shares of the global loss
    out = MinibatchStats(**lo)
    out.approxkl, out.clipfrac, out.entropy = s["approxkl"] / n_kept, s["clipped"] / n, s["entropy"] / n
    out.ratio_mean, out.ratio_max, out.dual_clipfrac = s["ratio"] / n_kept, ratio_max, s["dual_clipped"] / n
    out.outside_filter_frac = s["outside"] / n
    if "vpred" in s:
        out.vpred, out.verror, out.vf_clipfrac = s["vpred"] / n, s["verror"] / n, s["vclipped"] / n
    return out


def _check_accumulation(steppers, n_micro: int) -> None:
    """Plain steppers step after ``n_micro`` micro-batches; a DeepSpeed engine must have been built
    with that many accumulation steps (``MinibatchLayout``)."""
    for st in steppers:
        if isinstance(st, TorchStepper):
            st.micro_batches = n_micro
        elif st is not None and st.micro_batches != n_micro:
            raise ValueError(f"the DeepSpeed engine accumulates {st.micro_batches} micro-batches per step but each "
                             f"minibatch has {n_micro} per rank: build it with gradient_accumulation_steps={n_micro} "
                             "(MinibatchLayout.of(...).micro_batches)")


def _train_minibatch(policy_st: Stepper, critic_st: Optional[Stepper], minibatch: Rollout, plan: MinibatchPlan,
                     hp: PPOHyperParams, kl_coef: float, world: _World) -> MinibatchStats:
    """One optimizer step on ``minibatch`` (this rank's micro-batches of it, accumulated)."""
    if hp.advantages_per_minibatch:  # lm-human-preferences: whitening and GAE inside loss()
        adv, ret = advantages_of(minibatch, hp)
        minibatch = minibatch.replace(advantages=adv, returns=ret)
    norms = _Normalizers.of(minibatch.train_mask, hp)
    for st in (policy_st, critic_st):
        if st is not None:
            st.zero_grad()
            if hp.max_tokens_per_micro_batch:
                st.set_micro_batches(len(plan.micro))
    parts, pieces = [], []
    for i, pos in enumerate(plan.micro):
        p, pc = _micro_loss(policy_st, critic_st, minibatch.select(pos), hp, kl_coef, norms.select(pos),
                            float(world.size))
        parts.append(p)
        pieces.append(pc)
        if hp.joint_grad_clip and critic_st is not None and i == len(plan.micro) - 1:
            clip_jointly((policy_st, critic_st), hp.max_grad_norm)  # before either optimizer steps
        for st in (policy_st, critic_st):
            if st is not None:
                st.step()
    return _minibatch_stats(parts, pieces, world)


@dataclass(frozen=True)
class _Normalizers:
    """What a minibatch's losses divide by (``Aggregation.normalizer``): () counts of the whole
    minibatch, or (mb,) per-row normalisers with ``hp.loss_group_rows`` (``algos.group_normalizer``),
    for the policy's tokens and for the value loss's (``value_mask``: the score position's)."""

    policy: torch.Tensor
    value: torch.Tensor
    value_mask: torch.Tensor

    @classmethod
    def of(cls, mask: torch.Tensor, hp: PPOHyperParams) -> "_Normalizers":
        vmask = hp.score_place.value_mask(mask)  # (mb, R) bool
        if hp.loss_group_rows is None:
            policy = hp.aggregation.normalizer(mask)  # () token or row count
            return cls(policy, policy if vmask is mask else hp.aggregation.normalizer(vmask), vmask)
        return cls(algos.group_normalizer(hp.aggregation, mask, hp.loss_group_rows),
                   algos.group_normalizer(hp.aggregation, vmask, hp.loss_group_rows), vmask)

    def select(self, pos: torch.Tensor) -> "_Normalizers":
        """The rows ``pos`` of the minibatch (per-row normalisers follow their rows)."""
        pick = lambda t: t[pos] if t.dim() else t  # noqa: E731
        return _Normalizers(pick(self.policy), pick(self.value), self.value_mask[pos])


def clip_jointly(steppers, max_norm: float) -> None:
    """Scale the gradients of every stepper's module by ``min(1, max_norm / (norm + 1e-6))``, the
    norm taken over all of them together (``torch.nn.utils.clip_grad_norm_``; DeepSpeed's
    ``gradient_clipping`` over an engine holding both models, MOSS-RLHF). The steppers' own
    clipping must be off. A DeepSpeed engine holds whole, averaged gradients in ``.grad`` only at
    ZeRO stage 0 in fp32 (the trainer refuses ``joint_grad_clip`` otherwise)."""
    params = [p for st in steppers for p in st.module.parameters() if p.requires_grad and p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def ppo_update(policy_st: Stepper, experience: Rollout, hp: PPOHyperParams, *, kl_coef: float,
               generator: torch.Generator, critic_st: Optional[Stepper] = None) -> list[MinibatchStats]:
    """``hp.num_epochs`` epochs over ``experience`` (the global batch, identical on every rank),
    ``hp.num_minibatches`` optimizer steps each, a fresh permutation from ``generator`` every
    epoch ("N details" #16). Returns one ``MinibatchStats`` per optimizer step."""
    world = _World.current()
    B = experience.batch_size
    dev = experience.response_ids.device
    tokens = None
    if hp.max_tokens_per_micro_batch:  # the count varies by minibatch: set in _train_minibatch
        tokens = row_tokens(experience)
    else:
        _check_accumulation((policy_st, critic_st), MinibatchLayout.of(B, hp, world.size).micro_batches)
    stats = []
    for _ in range(hp.num_epochs):
        for plan in epoch_plan(torch.randperm(B, generator=generator).to(dev), hp, world, tokens):
            stats.append(_train_minibatch(policy_st, critic_st, experience.select(plan.rows), plan, hp, kl_coef, world))
    return stats
