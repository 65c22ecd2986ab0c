"""The fast PPO iteration: experience and update, independent of how optimizers step.

``make_experience`` and ``ppo_update`` are what ``rlhf_fast.reference.ppo.ppo_iteration`` does,
computed with the fused ops (``rlhf_fast.ops``: log-probs straight into float32, one-launch
GAE and whitening) and the loss registries of ``rlhf_fast.algos``; the parity tests hold the two
to each other. Optimizer stepping goes through a ``Stepper``: ``TorchStepper`` (a module and a
``torch.optim`` optimizer, as the reference) or ``DeepSpeedStepper`` (a DeepSpeed engine, ZeRO
0-3), so the same loop runs in the parity tests and in the trainer.

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


class Stepper(Protocol):
    """What the update loop needs from a trained module and its optimizer."""

    module: torch.nn.Module

    def zero_grad(self) -> None: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None:
        """Called after every micro-batch; the optimizer steps at the minibatch boundary."""


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

    def zero_grad(self) -> None:
        pass  # DeepSpeed zeroes gradients after each optimizer step

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        self.engine.step()


# ---- experience -------------------------------------------------------------------------------


def policy_forward(policy, critic, batch: Rollout, temperature: float, *, entropy: bool = False):
    """(logprobs, entropy or None, values or None), each (b, R), of the response tokens."""
    out = policy.logprobs(batch.sequences, batch.attention_mask, temperature=temperature, return_entropy=entropy,
                          response_start=batch.response_start)
    values = out.values
    if critic is not None:
        values = critic(batch.sequences, batch.attention_mask, response_start=batch.response_start).values
    return out.logprobs, out.entropy, values


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


def epoch_plan(perm: torch.Tensor, hp: PPOHyperParams, world: "_World") -> list[MinibatchPlan]:
    """The minibatches and this rank's micro-batches of one epoch, from its permutation."""
    B = perm.numel()
    if B % hp.num_minibatches:
        raise ValueError(f"rollout batch {B} is not divisible by num_minibatches {hp.num_minibatches}")
    mb_size = B // hp.num_minibatches
    if mb_size % world.size:
        raise ValueError(f"minibatch size {mb_size} is not divisible by the world size {world.size}")
    mine = torch.arange(world.rank, mb_size, world.size, device=perm.device)
    micro = min(hp.micro_batch_size or mine.numel(), mine.numel())
    chunks = list(mine.split(micro))
    return [MinibatchPlan(perm[s : s + mb_size], chunks) for s in range(0, B, mb_size)]


def first_epoch_plan(generator: torch.Generator, B: int, hp: PPOHyperParams, device=None) -> list[MinibatchPlan]:
    """The plan ``ppo_update`` will draw for its first epoch, without advancing ``generator``."""
    g = torch.Generator()
    g.set_state(generator.get_state())
    return epoch_plan(torch.randperm(B, generator=g).to(device), hp, _World.current())


@torch.no_grad()
def score_logprobs(policy, critic, ref_policy, rollout: Rollout, hp: PPOHyperParams, *, plan: list[MinibatchPlan]):
    """Old log-probs and values (current weights) and reference log-probs of every row of the
    global batch: (B, R) float32 each (values None without value head or critic).

    Each rank scores exactly the micro-batches it will train on first (``plan`` = the first
    epoch's), with the same rows in the same order: the first minibatch's forward then sees
    bit-identical inputs, so its ratio is exactly 1 (TRL #454) however CPU / GPU matmuls depend
    on the batch shape. The rows of other ranks arrive through one all-reduce (sum of zeros)."""
    B, R = rollout.response_ids.shape
    dev = rollout.response_ids.device
    lp = torch.zeros(B, R, device=dev)
    ref = torch.zeros(B, R, device=dev)
    values = None
    for mb in plan:
        for pos in mb.micro:
            rows = mb.rows[pos]
            part = rollout.select(rows)
            l, _, v = policy_forward(policy, critic, part, hp.temperature)
            lp[rows] = l.float()
            ref[rows] = ref_policy.logprobs(part.sequences, part.attention_mask, temperature=hp.temperature,
                                            response_start=part.response_start).logprobs.float()
            if v is not None:
                values = torch.zeros(B, R, device=dev) if values is None else values
                values[rows] = v.float()
    world = _World.current()
    if world.size > 1:
        has_values = torch.tensor([0.0 if values is None else 1.0], device=dev)
        dist.all_reduce(has_values)
        stacked = torch.stack([lp, ref, values if values is not None else torch.zeros_like(lp)])
        dist.all_reduce(stacked)
        lp, ref = stacked[0], stacked[1]
        values = stacked[2] if has_values.item() > 0 else None
    return lp, ref, values


def finish_experience(rollout: Rollout, hp: PPOHyperParams, *, kl_coef: float,
                      score_stats: Optional[algos.RunningMoments] = None) -> Rollout:
    """Rollout with logprobs / ref_logprobs (/ values) filled -> scores normalised (with
    ``hp.normalize_scores``: ``score_stats`` is updated with this global batch, then applied) and
    clipped, rewards and KL shaped, advantages and returns (unless ``hp.advantages_per_minibatch``:
    then per minibatch)."""
    mask = rollout.response_mask
    scores = rollout.scores.float()
    if hp.normalize_scores:
        if score_stats is None:
            raise ValueError("algo.normalize_scores needs the trainer's running score statistics (score_stats)")
        score_stats.update(scores)
        scores = score_stats.normalize(scores, shift_mean=hp.score_norm_shift_mean, unbiased=hp.score_norm_unbiased)
    if hp.score_clip is not None:
        scores = scores.clamp(-hp.score_clip, hp.score_clip)
    rewards, kl = algos.compute_rewards(scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef=kl_coef,
                                        placement=hp.kl_placement, estimator=hp.kl_estimator, clamp=hp.kl_clamp)
    values = None if rollout.values is None else torch.where(mask, rollout.values, 0.0)
    out = rollout.replace(scores=scores, values=values, kl=kl, rewards=rewards)
    adv, ret = advantages_of(out, hp)
    return out.replace(advantages=adv, returns=ret)


def advantages_of(batch: Rollout, hp: PPOHyperParams):
    inp = algos.AdvantageInput(rewards=batch.rewards, mask=batch.response_mask, values=batch.values,
                               group_ids=batch.group_ids)
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
    fields = {}
    for name in ("query_ids", "query_mask", "response_ids", "response_mask", "scores", "logprobs", "ref_logprobs",
                 "values", "kl", "rewards", "advantages", "returns", "group_ids"):
        t = getattr(rollout, name)
        if t is None:
            fields[name] = None
            continue
        src = t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()
        parts = [torch.empty_like(src) for _ in range(world)]
        dist.all_gather(parts, src)
        cat = torch.cat(parts)
        fields[name] = cat.bool() if t.dtype == torch.bool else cat
    return Rollout(**fields)


# ---- update -----------------------------------------------------------------------------------


def _micro_loss(policy_st: Stepper, critic_st: Optional[Stepper], micro: Rollout, hp: PPOHyperParams, kl_coef: float,
                normalizer, scale: float):
    """Backward of one micro-batch's share of the minibatch loss; returns the detached loss parts
    and the per-token pieces for the minibatch statistics."""
    mask = micro.response_mask
    critic = critic_st.module if critic_st is not None else None
    need_entropy = True  # policy/entropy is always reported; the op computes it in the same pass
    logprobs, entropy, values = policy_forward(policy_st.module, critic, micro, hp.temperature, entropy=need_entropy)
    pg = algos.policy_loss(hp.policy_loss, logprobs, micro.logprobs, micro.advantages, mask, hp.policy_loss_params(),
                           normalizer=normalizer)
    loss = pg.loss
    kl_part = torch.zeros((), device=logprobs.device)
    if hp.kl_placement == "in_loss":
        term, kl_part = algos.kl_loss(logprobs, micro.ref_logprobs, mask, coef=kl_coef, estimator=hp.kl_estimator,
                                      clamp=hp.kl_clamp, aggregation=hp.loss_aggregation, normalizer=normalizer)
        loss = loss + term
    if hp.ent_coef != 0.0:
        loss = loss + algos.entropy_bonus(entropy, mask, coef=hp.ent_coef, aggregation=hp.loss_aggregation,
                                          normalizer=normalizer)
    vf = None
    if hp.advantage_estimator == "gae":
        vf = algos.clipped_value_loss(values, micro.values, micro.returns, mask, clip_range=hp.value_clip_range,
                                      aggregation=hp.loss_aggregation, normalizer=normalizer)
    if critic_st is None:
        total = loss + (hp.vf_coef * vf.loss if vf is not None else 0.0)
        policy_st.backward(total * scale)
    else:  # disjoint parameters: two backward passes give the gradients of the summed loss
        policy_st.backward(loss * scale)
        critic_st.backward(hp.vf_coef * vf.loss * scale)
    value_loss = vf.loss.detach() if vf is not None else torch.zeros((), device=loss.device)
    parts = dict(loss=(loss.detach() + hp.vf_coef * value_loss), policy_loss=pg.loss.detach(), value_loss=value_loss,
                 kl_loss=kl_part.detach())
    logr = torch.where(mask, logprobs.detach() - micro.logprobs, 0.0)
    pieces = dict(mask=mask, logr=logr, entropy=entropy.detach(),
                  clipped=_pg_clipped(logr, micro.advantages, hp), vpred=None if vf is None else values.detach())
    if vf is not None:
        pieces.update(verror=(values.detach() - micro.returns) ** 2, vclipped=_v_clipped(values.detach(), micro, hp))
    return parts, pieces


def _pg_clipped(logr, adv, hp: PPOHyperParams):
    if hp.policy_loss != "ppo_clip":
        return torch.zeros_like(logr, dtype=torch.bool)
    ratio = torch.exp(logr)
    high = hp.clip_range if hp.clip_range_high is None else hp.clip_range_high
    return -adv * torch.clamp(ratio, 1 - hp.clip_range, 1 + high) > -adv * ratio


def _v_clipped(values, micro: Rollout, hp: PPOHyperParams):
    if hp.value_clip_range is None:
        return torch.zeros_like(values, dtype=torch.bool)
    clipped = micro.values + torch.clamp(values - micro.values, -hp.value_clip_range, hp.value_clip_range)
    active = (values - micro.values).abs() > hp.value_clip_range  # see algos.clipped_value_loss
    return active & ((clipped - micro.returns) ** 2 > (values - micro.returns) ** 2)


def _minibatch_stats(parts: list[dict], pieces: list[dict], world: _World) -> MinibatchStats:
    """Losses summed over this rank's micro-batches and over ranks; token statistics over every
    valid token of the global minibatch (sums and counts all-reduced in one collective)."""
    m = torch.cat([p["mask"] for p in pieces])
    cat = {k: torch.cat([p[k] for p in pieces]).double() for k in pieces[0] if k != "mask" and pieces[0][k] is not None}
    sums = {k: torch.where(m, v, 0.0).sum() for k, v in cat.items()}
    if "logr" in cat:
        sums["approxkl"] = torch.where(m, 0.5 * cat["logr"] ** 2, 0.0).sum()
        sums["ratio"] = torch.where(m, torch.exp(cat["logr"]), 0.0).sum()
    losses = {k: sum(p[k].double() for p in parts) for k in parts[0]}
    ratio_max = torch.where(m, torch.exp(cat["logr"]), -torch.inf).max() if m.any() else torch.zeros((), dtype=torch.float64)
    keys = sorted(sums)
    vec = torch.stack([m.sum().double()] + [sums[k] for k in keys] + [losses[k] for k in sorted(losses)])
    if world.size > 1:
        dist.all_reduce(vec)
        mx = ratio_max.reshape(1).clone()
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        ratio_max = mx[0]
    n = vec[0].clamp(min=1)
    s = dict(zip(keys, vec[1 : 1 + len(keys)]))
    lo = dict(zip(sorted(losses), vec[1 + len(keys):]))  # each rank's parts are shares of the global loss
    out = MinibatchStats(**lo)
    out.approxkl, out.clipfrac, out.entropy = s["approxkl"] / n, s["clipped"] / n, s["entropy"] / n
    out.ratio_mean, out.ratio_max = s["ratio"] / n, ratio_max
    if "vpred" in s:
        out.vpred, out.verror, out.vf_clipfrac = s["vpred"] / n, s["verror"] / n, s["vclipped"] / n
    return out


def ppo_update(policy_st: Stepper, experience: Rollout, hp: PPOHyperParams, *, kl_coef: float,
               generator: torch.Generator, critic_st: Optional[Stepper] = None) -> list[MinibatchStats]:
    """``hp.num_epochs`` epochs over ``experience`` (the global batch, identical on every rank),
    ``hp.num_minibatches`` optimizer steps each, a fresh permutation from ``generator`` every
    epoch ("N details" #16). Returns one ``MinibatchStats`` per optimizer step."""
    world = _World.current()
    B = experience.batch_size
    dev = experience.response_ids.device
    n_micro = len(epoch_plan(torch.arange(B), hp, world)[0].micro)
    for st in (policy_st, critic_st):
        if isinstance(st, TorchStepper):
            st.micro_batches = n_micro
        elif st is not None and st.micro_batches != n_micro:
            raise ValueError(f"the DeepSpeed engine accumulates {st.micro_batches} micro-batches per step but each "
                             f"minibatch has {n_micro} per rank: build it with gradient_accumulation_steps={n_micro}")
    stats = []
    for _ in range(hp.num_epochs):
        for plan in epoch_plan(torch.randperm(B, generator=generator).to(dev), hp, world):
            minibatch = experience.select(plan.rows)
            if hp.advantages_per_minibatch:  # lm-human-preferences: whitening and GAE inside loss()
                adv, ret = advantages_of(minibatch, hp)
                minibatch = minibatch.replace(advantages=adv, returns=ret)
            if hp.loss_aggregation == "token-mean":
                normalizer = minibatch.response_mask.sum().clamp(min=1).float()
            else:
                normalizer = torch.tensor(float(plan.rows.numel()), device=dev)
            policy_st.zero_grad()
            if critic_st is not None:
                critic_st.zero_grad()
            parts, pieces = [], []
            for pos in plan.micro:
                p, pc = _micro_loss(policy_st, critic_st, minibatch.select(pos), hp, kl_coef, normalizer,
                                    float(world.size))
                parts.append(p)
                pieces.append(pc)
                policy_st.step()
                if critic_st is not None:
                    critic_st.step()
            stats.append(_minibatch_stats(parts, pieces, world))
    return stats
