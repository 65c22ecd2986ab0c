"""One PPO iteration end to end, phase by phase: rlhf_fast vs a baseline assembled the way TRL does it.

    python benchmarks/bench_ppo.py            # this device's default size, writes a JSON record
    python benchmarks/bench_ppo.py --quick    # tiny model, a smoke run
    python benchmarks/bench_ppo.py --vocab 32000 --decode compiled   # a larger vocabulary, compiled decode
    pytest benchmarks/bench_ppo.py --benchmark-disable   # CI: tiny run, the two sides' math checked equal

Both sides start every repetition from the same weights (policy with a value head, frozen
reference, reward model: one copy of each shared, the trained policy copied per side), the same
left-padded prompts (B rows of the built-in task), responses of exactly R tokens (EOS ignored,
"N details" #4), PRESETS["tldr"] math (k1 KL in the reward, GAE gamma 1 lam 0.95, whitened
advantages, clip 0.2, value clip 0.2, vf_coef 0.1, 4 epochs x 1 minibatch, temperature 0.7) and
the same optimizer (torch.optim.AdamW, lr 1e-5, eps 1e-5, fresh each repetition).

Phases (the names of PPOTrainer's ``time/*_s`` metrics):
  generate    rlhf_fast: HybridEngine (engine-owned KV buffers; ``--decode``: its decode path, default
              "auto" as PPOTrainer: eager on a CPU, the compiled static-cache step on CUDA)
              trl_style: HF ``model.generate``
              (DynamicCache, do_sample, top_k=0, top_p=1, temperature + 1e-7 as TRL)
  score       the same random-init RewardModel; rlhf_fast: ``RewardModel.forward`` (the rollout stage's Scorer, trainers/rollout.py);
              trl_style: TRL ``get_reward`` (backbone with output_hidden_states, head on every position,
              read at the first pad - 1)
  logprobs    old log-probs + values (one policy forward) and reference log-probs;
              rlhf_fast_rollout_lp: ``ppo.old_logprobs: rollout`` (the engine's log-probs are the
              old ones: the policy's LM head is skipped, its backbone runs for the value head)
              rlhf_fast: ``ppo_core.score_logprobs`` (LM head on response positions only, fused
              log-prob op, float32 out); trl_style: full-logits HF forward (output_hidden_states),
              ``logits / (T + 1e-7)`` then ``selective_log_softmax`` (fp32: gather - per-row
              logsumexp loop; bf16: per-row log_softmax loop), value head on hidden_states[-1]
  advantages  rlhf_fast: ``ppo_core.finish_experience`` (fused shaping, GAE, whitening);
              trl_style: ``-kl_coef * (lp - ref)``, score scattered at the last token, a Python
              ``for t in reversed(range(R))`` GAE loop, masked whitening with plain torch ops
  train       4 epochs x 1 minibatch; rlhf_fast: ``ppo_core.ppo_update`` with a ``TorchStepper``;
              trl_style: full-logits forward, ``log_softmax + gather``, clipped policy and value
              losses, entropy from the full logits for the stats (as TRL), AdamW step
Deviations from TRL's PPOTrainer, so that both sides do the same model work: a value head on the
policy instead of TRL's separate value model; old log-probs recomputed by a forward (TRL takes
them from the generation scores, ``output_scores=True``, which moves one policy forward into
generate); no stop-token truncation (TRL's default ``stop_token=None``); one rollout forward
chunk (TRL's ``local_rollout_forward_batch_size`` 64 >= B).

Timing: the two sides alternate inside every repetition (which goes first alternates too), so
load from other processes on a shared machine hits both alike; one untimed warm-up iteration
each; p20/p50/p80 per phase and of the per-repetition total; the speed-up is baseline / rlhf_fast
of the p50s, and ``speedup_paired`` the median of the per-repetition ratios. On a GPU every
phase boundary synchronises. Physics: ``tflops`` counts the model FLOPs a plain implementation
does (2 * non-embedding params * tokens per forward, x3 for forward + backward, attention
ignored: P + R <= 256 here) for both sides alike, so its ratio is the speed ratio; generate also
reports response tokens/s. On a CPU the default is one torch thread: on a shared 2-core machine
two OpenMP threads stall whenever another process takes one core (the same phase then varies
10x between repetitions); one thread gives repeatable, if lower, figures (``--threads``).

Sizes: quick (CPU smoke) llama size="test", B=8, R=8; cpu: llama size="task" (~3.5M params,
631-token vocabulary), B=32, R=24, float32; gpu: a Qwen2-0.5B-shaped config (hidden 896, 24
layers, 14/2 heads, vocabulary 151936, random weights), B=64, R=128, bfloat16 weights on both
sides (pure-bf16 AdamW: a timing set-up, not a training recipe). No GPU figure has been recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from rlhf_fast.algos import PRESETS, Rollout  # noqa: E402
from rlhf_fast.engine import HybridEngine, SamplingParams  # noqa: E402
from rlhf_fast.models import Policy, RewardModel  # noqa: E402
from rlhf_fast.tasks import get_task, tiny_config  # noqa: E402
from rlhf_fast.reference import peers  # noqa: E402
from rlhf_fast.trainers import ppo_core  # noqa: E402

PHASES = ("generate", "score", "logprobs", "advantages", "train")
IMPLS = ("rlhf_fast", "rlhf_fast_rollout_lp", "trl_style")
LR, ADAM_EPS = 1e-5, 1e-5

SIZES = {
    # name: (arch, tiny_config size, config overrides, B, R, dtype, reps)
    "quick": ("llama", "test", {}, 8, 8, torch.float32, 3),
    "cpu": ("llama", "task", {}, 32, 24, torch.float32, 20),
    "gpu": ("qwen2", "task", dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                  num_key_value_heads=2, intermediate_size=4864, max_position_embeddings=1024),
            64, 128, torch.bfloat16, 10),
}


@dataclass
class Bench:
    """What both sides share. q_ids / q_mask: (B, P) left-padded prompts; init: the policy's
    starting state_dict (each side's policy is reset to it before every iteration)."""

    policies: dict  # impl -> Policy (trained copy)
    ref: Policy
    reward_model: RewardModel
    q_ids: torch.Tensor
    q_mask: torch.Tensor
    R: int
    pad: int
    hp: object
    kl_coef: float
    init: dict
    engine: HybridEngine
    device: torch.device


def build(size: str, device: torch.device, *, seed: int = 0, vocab: int | None = None, decode: str = "auto",
          batch: int | None = None, resp_len: int | None = None, minibatches: int | None = None) -> Bench:
    """``vocab`` overrides the vocabulary size (special ids stay the task tokenizer's; the
    responses are never decoded, so ids past the tokenizer are fine). ``decode``: the engine's
    decode path (``HybridEngine(decode=...)``, ``ppo.generation.decode``; "auto" is what
    PPOTrainer uses by default: eager on a CPU, compiled on CUDA). ``batch`` / ``resp_len`` /
    ``minibatches`` override the size's B, R and the preset's minibatch count (the task has 4000
    training prompts, so B <= 4000; benchmarks/peer_trl_ppo.py runs this at its own sizes)."""
    arch, cfg_size, overrides, B, R, dtype, _ = SIZES[size]
    B, R = batch or B, resp_len or R
    task = get_task("tiny_sentiment")
    tok = task.tokenizer
    cfg = tiny_config(arch, tokenizer=tok, size=cfg_size, **{**overrides, **({"vocab_size": vocab} if vocab else {})})
    policy = Policy.from_pretrained(cfg, value_head=True, seed=seed, dtype=dtype).to(device)
    policy.model.generation_config.eos_token_id = None  # fixed-length responses on both sides
    ref = Policy(copy.deepcopy(policy.model)).eval().requires_grad_(False)
    rm = RewardModel.from_pretrained(cfg, new_head=True, seed=seed + 1, dtype=dtype).to(device).eval().requires_grad_(False)
    texts = [r["prompt"] for r in task.prompt_records("train")[:B]]
    enc = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    P = max(map(len, enc))
    q_ids = torch.tensor([[tok.pad_token_id] * (P - len(e)) + e for e in enc], device=device)
    q_mask = torch.tensor([[0] * (P - len(e)) + [1] * len(e) for e in enc], device=device).bool()
    hp = PRESETS["tldr"].replace()
    if minibatches:
        hp.num_minibatches = minibatches
    policies = {name: copy.deepcopy(policy) for name in IMPLS}
    engine = HybridEngine(policies["rlhf_fast"], pad_token_id=tok.pad_token_id, max_batch_size=B, max_seq_len=P + R,
                          decode=decode)
    return Bench(policies, ref, rm, q_ids, q_mask, R, tok.pad_token_id, hp, hp.kl_init,
                 copy.deepcopy(policy.state_dict()), engine, device)


class Clock:
    """Seconds per phase; on a GPU each boundary synchronises (CPU-GPU sync point: timing)."""

    def __init__(self, device):
        self.device, self.seconds = device, {}

    def __call__(self, name):
        clock = self

        class _Ctx:
            def __enter__(self):
                clock._sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock._sync()
                clock.seconds[name] = clock.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _fresh(b: Bench, impl: str):
    policy = b.policies[impl]
    policy.load_state_dict(b.init)
    return policy, torch.optim.AdamW(policy.parameters(), lr=LR, eps=ADAM_EPS)


# ---- (a) rlhf_fast: the PPOTrainer iteration without DeepSpeed ---------------------------------


def fast_experience(b: Bench, policy, rollout: Rollout, generator, engine_logprobs=None):
    """Old / reference log-probs and values; with ``engine_logprobs`` (``ppo.old_logprobs:
    rollout``) the engine's are the old ones and the policy's LM head is skipped."""
    plan = ppo_core.first_epoch_plan(generator, rollout.batch_size, b.hp, device=b.device)
    lp, ref_lp, values = ppo_core.score_logprobs(policy, None, b.ref, rollout, b.hp, plan=plan,
                                                 old_logprobs=engine_logprobs)
    return rollout.replace(logprobs=lp, ref_logprobs=ref_lp, values=values)


def fast_iteration(b: Bench, seed: int, clock: Clock, *, old_from_rollout: bool = False):
    """PPOTrainer's iteration; ``old_from_rollout``: ``ppo.old_logprobs: rollout``."""
    policy, opt = _fresh(b, "rlhf_fast")  # the engine's policy: both rlhf_fast variants run on it
    hp = b.hp
    generator = torch.Generator().manual_seed(seed)
    with clock("generate"):
        out = b.engine.generate(b.q_ids, b.q_mask, SamplingParams(
            max_new_tokens=b.R, do_sample=True, temperature=hp.temperature, top_k=0, top_p=1.0, seed=seed))
        resp, rmask = out.responses, out.response_mask
    with clock("score"), torch.no_grad():
        seq, att = torch.cat([b.q_ids, resp], 1), torch.cat([b.q_mask, rmask], 1)
        scores = b.reward_model(seq, att.long()).scores.float()
        rollout = Rollout(b.q_ids, b.q_mask, resp, rmask, scores)
    with clock("logprobs"):
        rollout = fast_experience(b, policy, rollout, generator,
                                  torch.where(rmask, out.logprobs, 0.0) if old_from_rollout else None)
    with clock("advantages"):
        exp = ppo_core.finish_experience(rollout, hp, kl_coef=b.kl_coef)
    with clock("train"):
        policy.train()
        stats = ppo_core.ppo_update(ppo_core.TorchStepper(policy, opt, max_grad_norm=hp.max_grad_norm), exp, hp,
                                    kl_coef=b.kl_coef, generator=generator)
    return exp, stats


# ---- (b) the TRL-style baseline (written from TRL's PPOTrainer semantics) ------------------------


selective_log_softmax = peers.trl_selective_log_softmax


def trl_forward(model, query_responses, pad):
    """TRL's ``forward``: mask = ids != pad, position ids cumsum(mask) - mask, all hidden states."""
    mask = query_responses != pad
    position_ids = mask.cumsum(1) - mask.long()
    input_ids = torch.masked_fill(query_responses, ~mask, 0)
    return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, return_dict=True,
                 output_hidden_states=True)


def trl_get_reward(rm: RewardModel, query_responses, pad, context_length):
    """TRL's ``get_reward``: backbone with all hidden states, the head on every position, read at
    the first pad of the response - 1."""
    mask = query_responses != pad
    out = rm.backbone(input_ids=torch.masked_fill(query_responses, ~mask, 0), attention_mask=mask,
                      position_ids=mask.cumsum(1) - mask.long(), return_dict=True, output_hidden_states=True,
                      use_cache=False)
    reward_logits = rm.head(out.hidden_states[-1])
    seq_len = first_true_indices(query_responses[:, context_length:] == pad) - 1 + context_length
    return rm.normalize(reward_logits[torch.arange(reward_logits.shape[0], device=seq_len.device), seq_len])


def first_true_indices(bools):
    row_len = bools.size(-1)
    zero_or_index = row_len * (~bools).long() + torch.arange(row_len, device=bools.device)
    return zero_or_index.min(-1).values


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def masked_whiten(x, mask, unbiased, shift_mean=True):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:  # TRL's masked_var applies Bessel's correction; PRESETS["tldr"] does not
        n = mask.sum()
        var = var * n / (n - 1)
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    return white if shift_mean else white + mean


@dataclass
class TRLBatch:
    """The baseline's experience, TRL's names: (B, R) each; padding_mask True past the end."""

    query_responses: torch.Tensor
    responses: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    padding_mask: torch.Tensor
    padding_mask_p1: torch.Tensor
    advantages: torch.Tensor = None
    returns: torch.Tensor = None


def trl_experience(b: Bench, policy: Policy, query_responses, scores, context_length) -> TRLBatch:
    """Old / reference log-probs and values, full logits, the TRL masks (INVALID_LOGPROB = 1.0)."""
    T = b.hp.temperature + 1e-7
    responses = query_responses[:, context_length:]
    with torch.no_grad():
        out = trl_forward(policy.model, query_responses, b.pad)
        logits = out.logits[:, context_length - 1 : -1] / T
        logprob = selective_log_softmax(logits, responses)
        del logits
        value = policy.value_head(out.hidden_states[-1])[:, context_length - 1 : -1]
        ref_logits = trl_forward(b.ref.model, query_responses, b.pad).logits[:, context_length - 1 : -1] / T
        ref_logprob = selective_log_softmax(ref_logits, responses)
        del ref_logits
    seq_len = first_true_indices(responses == b.pad) - 1
    idx = torch.arange(responses.shape[1], device=responses.device).repeat(responses.shape[0], 1)
    padding_mask = idx > seq_len.unsqueeze(1)
    padding_mask_p1 = idx > (seq_len + 1).unsqueeze(1)
    return TRLBatch(query_responses, responses, logprob.float().masked_fill(padding_mask, 1.0),
                    ref_logprob.float().masked_fill(padding_mask, 1.0), value.float().masked_fill(padding_mask_p1, 0),
                    scores.float(), padding_mask, padding_mask_p1)


def trl_advantages(b: Bench, x: TRLBatch) -> TRLBatch:
    hp = b.hp
    kl = x.logprobs - x.ref_logprobs
    rewards = -b.kl_coef * kl
    B, R = rewards.shape
    seq_len = first_true_indices(x.responses == b.pad) - 1
    p1 = seq_len + 1
    end = torch.where(p1 < R, p1, seq_len)  # TRL: the score goes one past the last token if it fits
    rewards[torch.arange(B, device=rewards.device), end] += x.scores
    rewards = rewards.masked_fill(x.padding_mask_p1, 0)
    advantages, returns = peers.trl_gae(rewards, x.values, ~x.padding_mask_p1, hp.gamma, hp.lam)
    advantages = masked_whiten(advantages, ~x.padding_mask, hp.whiten_unbiased).masked_fill(x.padding_mask, 0)
    x.advantages, x.returns = advantages, returns
    return x


def trl_train(b: Bench, policy: Policy, opt, x: TRLBatch, generator, context_length) -> list[dict]:
    hp = b.hp
    B = x.responses.shape[0]
    mb = B // hp.num_minibatches
    T = hp.temperature + 1e-7
    policy.train()
    stats = []
    for _ in range(hp.num_epochs):
        perm = torch.randperm(B, generator=generator).to(x.responses.device)
        for s in range(0, B, mb):
            i = perm[s : s + mb]
            out = trl_forward(policy.model, x.query_responses[i], b.pad)
            logits = out.logits[:, context_length - 1 : -1] / T
            new_all = F.log_softmax(logits.float(), dim=-1)
            new_lp = torch.gather(new_all, 2, x.responses[i].unsqueeze(-1)).squeeze(-1)
            new_lp = new_lp.masked_fill(x.padding_mask[i], 1.0)
            vpred = policy.value_head(out.hidden_states[-1])[:, context_length - 1 : -1]
            vpred = vpred.masked_fill(x.padding_mask_p1[i], 0)
            vclip = torch.clamp(vpred, x.values[i] - hp.value_clip_range, x.values[i] + hp.value_clip_range)
            vf1, vf2 = (vpred - x.returns[i]) ** 2, (vclip - x.returns[i]) ** 2
            vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), ~x.padding_mask_p1[i])
            diff = new_lp - x.logprobs[i]
            ratio = torch.exp(diff)
            pg1 = -x.advantages[i] * ratio
            pg2 = -x.advantages[i] * torch.clamp(ratio, 1.0 - hp.clip_range, 1.0 + hp.clip_range)
            pg_loss = masked_mean(torch.max(pg1, pg2), ~x.padding_mask[i])
            loss = pg_loss + hp.vf_coef * vf_loss
            loss.backward()
            if hp.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), hp.max_grad_norm)
            opt.step()
            opt.zero_grad()
            with torch.no_grad():  # TRL's per-minibatch statistics, entropy from the full logits
                prob = torch.softmax(logits, dim=-1)
                entropy = torch.logsumexp(logits, dim=-1) - torch.sum(prob * logits, dim=-1)
                stats.append(dict(policy_loss=pg_loss.detach(), value_loss=vf_loss.detach(),
                                  clipfrac=masked_mean((pg2 > pg1).float(), ~x.padding_mask[i]),
                                  approxkl=0.5 * (diff**2).mean(), entropy=entropy.mean()))
    return stats


def trl_iteration(b: Bench, seed: int, clock: Clock):
    policy, opt = _fresh(b, "trl_style")
    hp = b.hp
    context_length = b.q_ids.shape[1]
    gen_cfg = GenerationConfig(max_new_tokens=b.R, do_sample=True, temperature=hp.temperature + 1e-7, top_k=0,
                               top_p=1.0, pad_token_id=b.pad, eos_token_id=None)
    with clock("generate"), torch.no_grad():
        policy.eval()
        torch.manual_seed(seed)
        query_responses = policy.model.generate(input_ids=b.q_ids, attention_mask=b.q_mask.long(),
                                                generation_config=gen_cfg)
    with clock("score"), torch.no_grad():
        scores = trl_get_reward(b.reward_model, query_responses, b.pad, context_length)
    with clock("logprobs"):
        x = trl_experience(b, policy, query_responses, scores, context_length)
    with clock("advantages"):
        x = trl_advantages(b, x)
    with clock("train"):
        stats = trl_train(b, policy, opt, x, torch.Generator().manual_seed(seed), context_length)
    return x, stats


ITERATIONS = {"rlhf_fast": fast_iteration, "trl_style": trl_iteration,
              "rlhf_fast_rollout_lp": lambda b, seed, clock: fast_iteration(b, seed, clock, old_from_rollout=True)}


# ---- the measurement ----------------------------------------------------------------------------


def _quantiles(ts):
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else ts * 9
    return {"p20_ms": q[1] * 1e3, "p50_ms": statistics.median(ts) * 1e3, "p80_ms": q[7] * 1e3, "reps": len(ts)}


def _flops(b: Bench) -> dict:
    """Model FLOPs of each phase for a plain implementation (2 * params * tokens per forward,
    non-embedding params, LM head included; attention ignored)."""
    def n(m):
        emb = m.get_input_embeddings().weight
        return sum(p.numel() for p in m.parameters() if p is not emb) + (
            emb.numel() if m.get_output_embeddings() is not None and m.get_output_embeddings().weight is emb else 0)

    B, P = b.q_ids.shape
    tokens = B * (P + b.R)
    n_pol, n_rm = n(b.ref.model), n(b.reward_model.backbone)
    fwd = 2 * n_pol * tokens
    return {"generate": fwd, "score": 2 * n_rm * tokens, "logprobs": 2 * fwd,
            "advantages": None, "train": b.hp.num_epochs * 3 * fwd}


def run(size: str, device: torch.device, reps: int | None = None, vocab: int | None = None, decode: str = "auto",
        batch: int | None = None, resp_len: int | None = None, minibatches: int | None = None):
    b = build(size, device, vocab=vocab, decode=decode, batch=batch, resp_len=resp_len, minibatches=minibatches)
    dev = _common.device_info(device)
    reps = reps or SIZES[size][6]
    for impl in IMPLS:  # untimed warm-up (a compiled decode step compiles here)
        ITERATIONS[impl](b, 12345, Clock(device))
    samples = {impl: {ph: [] for ph in (*PHASES, "total")} for impl in IMPLS}
    for r in range(reps):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        for impl in order:
            clock = Clock(device)
            ITERATIONS[impl](b, 1000 + r, clock)
            for ph in PHASES:
                samples[impl][ph].append(clock.seconds[ph])
            samples[impl]["total"].append(sum(clock.seconds[ph] for ph in PHASES))
    B, P = b.q_ids.shape
    dtype = str(next(b.ref.parameters()).dtype).replace("torch.", "")
    case = {"size": size, "V": b.ref.config.vocab_size, "B": B, "P": P, "R": b.R, "dtype": dtype,
            "decode": b.engine.decode_path(device)}
    flops = _flops(b)
    flops["total"] = sum(v for v in flops.values() if v)
    rows = []
    for impl in IMPLS:
        for ph in (*PHASES, "total"):
            t = _quantiles(samples[impl][ph])
            extra = {"seconds_p50": round(t["p50_ms"] / 1e3, 4)}
            if impl != "rlhf_fast":  # trl_style: the baseline's time / rlhf_fast's; the rollout-log-prob
                # variant: rlhf_fast (recompute) / it, i.e. what taking the engine's log-probs saves
                mine, fast = samples[impl][ph], samples["rlhf_fast"][ph]
                base, new = (mine, fast) if impl == "trl_style" else (fast, mine)
                extra["speedup"] = round(_quantiles(base)["p50_ms"] / _quantiles(new)["p50_ms"], 3)
                extra["speedup_paired"] = round(statistics.median(x / y for x, y in zip(base, new)), 3)
            if ph in ("generate", "total"):
                extra["tokens_per_s"] = round(B * b.R / (t["p50_ms"] / 1e3), 1)
            rows.append(_common.result_row(impl, case, ph, t, dev, flops=flops[ph], **extra))
    params = sum(p.numel() for p in b.ref.parameters())
    config = {"size": size, "arch": SIZES[size][0], "vocab": b.ref.config.vocab_size,
              "params_m": round(params / 1e6, 2), "B": B, "P": P, "R": b.R, "reps": reps, "hp": "PRESETS['tldr']",
              "num_minibatches": b.hp.num_minibatches,
              "optimizer": f"AdamW(lr={LR}, eps={ADAM_EPS})", "torch_threads": torch.get_num_threads(),
              "order": "alternating within each repetition"}
    return rows, config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default per size)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1: see the docstring)")
    p.add_argument("--vocab", type=int, default=None, help="override the vocabulary size (where the logits dominate)")
    p.add_argument("--decode", default="auto", choices=("auto", "eager", "static", "compiled"),
                   help="rlhf_fast's decode path (ppo.generation.decode; auto: eager on a CPU, compiled on CUDA)")
    p.add_argument("--batch", type=int, default=None, help="override the size's rollout batch B")
    p.add_argument("--resp-len", type=int, default=None, help="override the size's response length R")
    p.add_argument("--minibatches", type=int, default=None, help="override the preset's minibatches per epoch (1)")
    p.add_argument("--json-out", default=None, help="also write the record to this path")
    p.add_argument("--no-save", action="store_true", help="do not write a JSON record")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    size = "quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")
    rows, config = run(size, device, args.reps, args.vocab, args.decode, args.batch, args.resp_len, args.minibatches)
    print(f"one PPO iteration, {config}")
    _common.print_table(rows, ["impl", "pass", "p20_ms", "p50_ms", "p80_ms", "speedup", "speedup_paired", "tflops",
                               "tokens_per_s"])
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(_common.make_record("ppo", device, config, rows), indent=1))
    if not args.no_save:
        print("record:", _common.write_record("ppo", device, config, rows))
    return rows


# ---- pytest: both sides do the same math; the benchmark runs at the tiny size --------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as main() on a CPU: two stall on a shared 2-core machine (docstring)."""
    with _common.torch_threads(1):
        yield


def _rollout(b: Bench, seed=0) -> Rollout:
    out = b.engine.generate(b.q_ids, b.q_mask, SamplingParams(max_new_tokens=b.R, do_sample=True, seed=seed))
    resp = out.responses.masked_fill(out.responses == b.pad, b.pad + 1)  # TRL reads a pad as the end
    seq = torch.cat([b.q_ids, resp], 1)
    with torch.no_grad():
        scores = b.reward_model(seq, torch.cat([b.q_mask, out.response_mask], 1).long()).scores
    return Rollout(b.q_ids, b.q_mask, resp, out.response_mask, scores)


def test_bench_ppo_same_math():
    torch.manual_seed(0)
    b = build("quick", torch.device("cpu"))
    b.hp.num_minibatches = 2  # exercise the minibatch split too
    with torch.no_grad():  # a non-zero value head, so the value path is checked
        for pol in b.policies.values():
            pol.value_head.linear.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        b.init = copy.deepcopy(b.policies["rlhf_fast"].state_dict())
    roll = _rollout(b)
    P = b.q_ids.shape[1]
    fast_pol, fast_opt = _fresh(b, "rlhf_fast")
    trl_pol, trl_opt = _fresh(b, "trl_style")
    exp = ppo_core.finish_experience(fast_experience(b, fast_pol, roll, torch.Generator().manual_seed(3)), b.hp,
                                     kl_coef=b.kl_coef)
    x = trl_advantages(b, trl_experience(b, trl_pol, roll.sequences, roll.scores, P))
    close = dict(rtol=1e-4, atol=1e-5)
    for ours, theirs in ((exp.logprobs, x.logprobs), (exp.ref_logprobs, x.ref_logprobs), (exp.values, x.values),
                         (exp.advantages, x.advantages), (exp.returns, x.returns)):
        torch.testing.assert_close(ours, theirs, **close)
    fast_stats = ppo_core.ppo_update(ppo_core.TorchStepper(fast_pol, fast_opt), exp, b.hp, kl_coef=b.kl_coef,
                                     generator=torch.Generator().manual_seed(7))
    trl_stats = trl_train(b, trl_pol, trl_opt, x, torch.Generator().manual_seed(7), P)
    assert len(fast_stats) == len(trl_stats) == b.hp.num_epochs * b.hp.num_minibatches
    for f, t in zip(fast_stats, trl_stats):
        torch.testing.assert_close(float(f.policy_loss), float(t["policy_loss"]), rtol=1e-3, atol=1e-5)
        torch.testing.assert_close(float(f.value_loss), float(t["value_loss"]), rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(float(f.entropy), float(t["entropy"]), rtol=1e-4, atol=1e-5)
    for (name, pf), pt in zip(fast_pol.named_parameters(), trl_pol.parameters()):
        torch.testing.assert_close(pf, pt, rtol=0, atol=LR * 0.1, msg=name)  # 8 Adam steps of <= lr each


def test_bench_ppo_record(tmp_path):
    rows, config = run("quick", torch.device("cpu"), reps=1)
    assert {(r["impl"], r["pass"]) for r in rows} == {(i, p) for i in IMPLS for p in (*PHASES, "total")}
    assert all(r["p50_ms"] > 0 for r in rows)
    assert all(r["speedup"] > 0 for r in rows if r["impl"] != "rlhf_fast")
    path = _common.write_record("ppo", torch.device("cpu"), config, rows, out_dir=tmp_path)
    assert path.exists()


if __name__ == "__main__":
    main()
