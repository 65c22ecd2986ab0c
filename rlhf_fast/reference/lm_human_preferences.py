"""openai/lm-human-preferences' PPO update, re-derived in float64 from its equations: the oracle
the ``lm_human_preferences`` preset is held to (tests/test_preset_parity.py,
scripts/check_preset_parity.py).

Written from ``lm_human_preferences/train_policy.py`` (``PPOTrainer.step``, ``compute_rewards``,
``train``, ``train_minibatch``, ``loss``), ``lm_tasks.py`` (``postprocess_fn_from_hparams``,
``filter_fn_from_hparams``) and ``utils/core.py`` (``whiten``, ``minimize``: TF's
``AdamOptimizer``), on one process (MPI world of 1), with the PyTorch model conventions of
vwxyzjn/lm-human-preference-details ``train_policy_accelerate.py`` (left-padded queries,
``position_ids = cumsum(mask) - mask``, logits ``[:, Q - 1 : -1]`` divided by the temperature).
Nothing here uses ``rlhf_fast.algos``, ``rlhf_fast.ops`` or ``rlhf_fast.reference.ppo``: the model
forward is the Hugging Face module's own, every formula is spelled out, in float64.

One update (``ppo_update``), per upstream:

    logprobs, values   = policy(queries + responses)        every sampled response token
    ref_logprobs       = ref_policy(queries + responses)
    rewards            = -kl_coef * (logprobs - ref_logprobs);  rewards[:, -1] += scores
    for epoch:  order = permutation;  for each minibatch:
        rewards  <- whiten(rewards, shift_mean=False)       biased variance (tf.nn.moments), +1e-8
        GAE over all R tokens (next value 0 after the last), returns = advantages + values
        advantages <- whiten(advantages)
        vf_loss = 0.5 * mean(max((v - ret)^2, (clip(v, old +- cv) - ret)^2))
        pg_loss = mean(max(-A * ratio, -A * clip(ratio, 1 +- c)))
        loss = pg_loss + vf_coef * vf_loss                  means over every token of the minibatch
        TF Adam step with lr_now = lr * (1 - update / n_updates)   the same for every minibatch
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


# ---- response processing (lm_tasks.py) ----------------------------------------------------------


def postprocess(responses: Tensor, truncate_token: int, truncate_after: int, padding_token: int) -> Tensor:
    """``postprocess_fn_from_hparams``: tokens after the first ``truncate_token`` at index >=
    ``truncate_after`` become ``padding_token`` (the cumsum-minus-self mask trick)."""
    hit = (responses == truncate_token).long()
    hit[:, :truncate_after] = 0
    after = (hit.cumsum(1) - hit).bool()
    return torch.where(after, torch.full_like(responses, padding_token), responses)


def passes_filter(responses: Tensor, truncate_token: int, truncate_after: int) -> Tensor:
    """``filter_fn_from_hparams``: (B,) bool, the response has ``truncate_token`` at an index >=
    ``truncate_after``; the others get ``penalty_reward_value`` (``make_score_fn.penalize``)."""
    return (responses[:, truncate_after:] == truncate_token).any(-1)


# ---- the model forward (train_policy_accelerate.py ``forward``) ---------------------------------


def forward(policy, queries: Tensor, query_mask: Tensor, responses: Tensor, temperature: float):
    """(logprobs, values), (B, R) each, float64: every response token is attended (upstream's
    responses have no padding). ``policy``: an ``rlhf_fast.models.Policy`` used only for its Hugging
    Face module (``policy.model``) and its value head's ``Linear`` (``policy.value_head.linear``)."""
    Q = queries.shape[1]
    ids = torch.cat([queries, responses], 1)
    mask = torch.cat([query_mask.bool(), torch.ones_like(responses, dtype=torch.bool)], 1)
    position_ids = (mask.long().cumsum(1) - mask.long()).clamp(min=0)
    out = policy.model(input_ids=torch.where(mask, ids, 0), attention_mask=mask.long(), position_ids=position_ids,
                       output_hidden_states=True, use_cache=False)
    logits = out.logits[:, Q - 1 : -1].double() / temperature
    logprobs = torch.gather(F.log_softmax(logits, -1), 2, responses.unsqueeze(-1)).squeeze(-1)
    hidden = out.hidden_states[-1][:, Q - 1 : -1]
    values = policy.value_head.linear(hidden.to(policy.value_head.linear.weight.dtype)).squeeze(-1).double()
    return logprobs, values


# ---- math (utils/core.py ``whiten``; train_policy.py ``loss``) ----------------------------------


def whiten(x: Tensor, shift_mean: bool = True) -> Tensor:
    """``utils.whiten``: moments over every element, variance divided by n (``tf.nn.moments``)."""
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def gae(rewards: Tensor, values: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """The ``for t in reversed(range(gen_length))`` loop of ``loss``: (advantages, returns)."""
    R = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t < R - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], 1)
    return advantages, advantages + values


@dataclass
class TFAdam:
    """``tf.train.AdamOptimizer(learning_rate=lr, epsilon=1e-5)`` as ``utils.minimize`` builds it:
    ``lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)``, ``p -= lr_t * m / (sqrt(v) + eps)``; the
    state persists across updates (one optimizer for the whole run)."""

    params: list
    eps: float = 1e-5
    beta1: float = 0.9
    beta2: float = 0.999
    t: int = 0
    m: list = field(default_factory=list)
    v: list = field(default_factory=list)

    def __post_init__(self):
        self.m = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]
        self.v = [torch.zeros_like(p, dtype=torch.float64) for p in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor], lr: float) -> None:
        self.t += 1
        lr_t = lr * math.sqrt(1 - self.beta2**self.t) / (1 - self.beta1**self.t)
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            g = torch.zeros_like(m) if g is None else g.double()
            m.mul_(self.beta1).add_((1 - self.beta1) * g)
            v.mul_(self.beta2).add_((1 - self.beta2) * g * g)
            p.sub_((lr_t * m / (v.sqrt() + self.eps)).to(p.dtype))


@dataclass(frozen=True)
class UpdateResult:
    """kl: (B,) summed per-token KL of each row (``record_step_stats``' ``objective/kl`` is its
    mean, which feeds the adaptive controller). rewards: (B, R) before whitening. lr: the lr of
    this update's optimizer steps."""

    kl: Tensor
    rewards: Tensor
    lr: float


def ppo_update(
    policy, ref_policy, optimizer: TFAdam, queries: Tensor, query_mask: Tensor, responses: Tensor, scores: Tensor, *,
    kl_coef: float, update: int, n_updates: int, lr: float, temperature: float, perms: Sequence[Tensor],
    nminibatches: int, gamma: float = 1.0, lam: float = 0.95, cliprange: float = 0.2, cliprange_value: float = 0.2,
    vf_coef: float = 0.1, whiten_rewards: bool = True,
) -> UpdateResult:
    """One ``PPOTrainer.step`` after sampling and scoring, leaving ``policy`` updated.

    responses: (B, R) every sampled token; scores: (B,) already penalised (``make_score_fn``).
    update: 0-based index of this update (upstream's global step); ``perms``: one (B,)
    permutation per epoch (``np.random.permutation`` upstream; the caller passes the order the
    compared implementation draws)."""
    B = responses.shape[0]
    mb = B // nminibatches
    with torch.no_grad():
        logprobs, values = forward(policy, queries, query_mask, responses, temperature)
        ref_logprobs, _ = forward(ref_policy, queries, query_mask, responses, temperature)
    kl = logprobs - ref_logprobs
    rewards = -kl_coef * kl
    rewards[:, -1] += scores.double()
    lr_now = lr * (1.0 - update / n_updates)  # train_minibatch: lr * (1 - policy_frac)
    params = optimizer.params
    for order in perms:
        for start in range(0, B, mb):
            idx = order[start : start + mb]
            r = whiten(rewards[idx], shift_mean=False) if whiten_rewards else rewards[idx]
            adv, ret = gae(r, values[idx], gamma, lam)
            adv = whiten(adv)
            new_logprobs, vpred = forward(policy, queries[idx], query_mask[idx], responses[idx], temperature)
            old_v = values[idx]
            vclipped = torch.clamp(vpred, old_v - cliprange_value, old_v + cliprange_value)
            vf_loss = 0.5 * torch.maximum((vpred - ret) ** 2, (vclipped - ret) ** 2).mean()
            ratio = torch.exp(new_logprobs - logprobs[idx])
            pg_loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)).mean()
            loss = pg_loss + vf_coef * vf_loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            optimizer.step(grads, lr_now)
    return UpdateResult(kl=kl.sum(-1), rewards=rewards, lr=lr_now)


def adaptive_kl(value: float, mean_kl: float, n_steps: int, *, target: float, horizon: float) -> float:
    """``AdaptiveKLController.update``: ``value * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)``."""
    err = min(max(mean_kl / target - 1.0, -0.2), 0.2)
    return value * (1.0 + err * n_steps / horizon)
