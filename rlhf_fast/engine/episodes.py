"""Multi-turn episodes on the hybrid engine (docs/architecture.md, "Multi-turn episodes").

``run_episodes(engine, ...)`` plays one episode per left-padded prompt: the model's turn is sampled
token by token until a stop token (a tool call's closing marker, EOS), the environment's answer to
the turn (``envs.Environment.step``) is appended as tokens, and the model goes on, until the
environment says done, ``max_turns`` model turns were taken, or the episode's token budget
(``params.max_new_tokens``: model and environment tokens together) is spent.

**The KV cache continues across turns.** One cache per chunk lives for the whole episode: the
prompt is prefilled once, and every later token (sampled or appended by the environment) goes
through one decode forward that adds its keys / values, so no turn re-runs the history. The batch
advances in lock-step, one token per row per step: a row whose environment answered feeds the
answer's tokens one per step while other rows sample (an answer is a few tokens; feeding it one
by one keeps every row's positions and cache in step with no ragged prefill).

**Token in, token out.** The output holds exactly the ids the engine fed through the model: the
sampled ids, and each text observation tokenised once, here, with ``add_special_tokens=False``.
The trainer forwards these ids as they are (nothing is decoded and re-encoded), so its log-probs of
the model's tokens are the engine's up to float32 rounding, in every turn.

**Sampling.** A row's uniform at step t is ``counter_uniform(seed, t, row)`` as in ``eager.py``; an
environment token takes a step (its draw is unused). ``min_new_tokens`` is refused (per-turn
minimums are not defined here).

Host syncs: one per step (the sampled tokens go to the host to detect turn ends and call the
environments): environments are host code, so this loop is for CPU-side or small-batch episodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from rlhf_fast.engine import cache as kv
from rlhf_fast.engine.inference import inference_mode, zero3_gathered
from rlhf_fast.engine.sampling import SamplingParams, sample_next
from rlhf_fast.envs.protocol import Environment, Turn, check_observation, check_step_result


@dataclass
class EpisodeOutput:
    """The episodes of ``run_episodes`` (R = the longest episode, at most ``max_new_tokens``).

    sequences: (B, P + R) int64: the prompts as given, then every episode token (model and
        environment), ``pad_token_id`` after the episode's end.
    response_mask: (B, R) bool: every token of the episode (model and environment): what the
        trainer attends to.
    action_mask: (B, R) bool: the model's tokens (a subset of ``response_mask``): what the policy
        loss, the KL and the value targets cover.
    logprobs: (B, R) float32: the engine's log-prob of each model token (as ``GenerationOutput``);
        0 on environment tokens and padding.
    turn_rewards: (B, R) float32: the reward of every ``step`` but the last, at the last token of
        the model turn it answered; 0 elsewhere.
    final_reward: (B,) float32: the reward of the episode's last ``step`` (0 if none was called).
    done: (B,) bool: the environment ended the episode (False: the turn limit or the budget did).
    has_stop: (B,) bool: the episode's last model turn ended with a stop token.
    turns: per row, the episode's segments in order: dicts ``{"role": "model" | "env", "start",
        "end"}`` (response columns [start, end)), for the sample log.
    """

    sequences: torch.Tensor
    response_mask: torch.Tensor
    action_mask: torch.Tensor
    logprobs: torch.Tensor
    turn_rewards: torch.Tensor
    final_reward: torch.Tensor
    done: torch.Tensor
    has_stop: torch.Tensor
    turns: list = field(default_factory=list)

    @property
    def responses(self) -> torch.Tensor:
        """(B, R) the episode part of ``sequences``."""
        return self.sequences[:, self.sequences.shape[1] - self.response_mask.shape[1]:]


@dataclass(frozen=True)
class _Rules:
    """What every row's step follows: the ids that end a model turn, the tokenizer's two
    directions, the turn limit and the vocabulary size (for the observation checks)."""

    stop: frozenset
    encode: Callable[[str], Sequence[int]]
    decode: Callable[[Sequence[int]], str]
    max_turns: int
    vocab: int


@dataclass
class _Row:
    """Host-side state of one episode."""

    env: Environment
    pending: list = field(default_factory=list)  # environment ids still to feed
    finished: bool = False
    done: bool = False
    has_stop: bool = False
    turn_start: int = 0
    turns_taken: int = 0
    final_reward: float = 0.0
    last_reward_at: int = -1
    segments: list = field(default_factory=list)

    def mark(self, role: str, t: int) -> None:
        """Token column ``t`` belongs to ``role``: extends the open segment or starts one."""
        if self.segments and self.segments[-1]["role"] == role and self.segments[-1]["end"] == t:
            self.segments[-1]["end"] = t + 1
        else:
            self.segments.append({"role": role, "start": t, "end": t + 1})


def _encode(obs, encode: Callable[[str], Sequence[int]], vocab: int, where: str) -> list:
    check_observation(obs, where=where, vocab_size=vocab)
    if obs is None or (isinstance(obs, str) and not obs):
        return []
    ids = list(encode(obs)) if isinstance(obs, str) else [int(t) for t in obs]
    check_observation(ids, where=where, vocab_size=vocab)
    return ids


def run_episodes(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams, *,
                 envs: Sequence[Environment], prompts: Sequence[str], encode: Callable[[str], Sequence[int]],
                 decode: Callable[[Sequence[int]], str], max_turns: int) -> EpisodeOutput:
    """One episode per row of the left-padded prompts ``input_ids`` / ``attention_mask`` (B, P) on
    ``engine`` (a ``hybrid.HybridEngine``: its model, KV buffers, checks and counters).

    envs: B fresh environments (row i's is ``envs[i]``); prompts: the B prompt texts given to
    ``reset``; encode: text -> ids (the policy's tokenizer, no special tokens added); decode: ids ->
    text (special tokens kept) for the ``Turn`` the environment sees; max_turns: model turns per
    episode at most. ``params.stop_ids()`` end a model turn (EOS among them ends it too)."""
    if params.min_new_tokens:
        raise ValueError("multi-turn episodes do not support min_new_tokens (set generation.min_new_tokens 0)")
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or max_turns < 1:
        raise ValueError(f"max_turns must be an int >= 1, got {max_turns!r}")
    if not params.stop_ids():
        raise ValueError("multi-turn episodes need stop tokens (generation.stop_tokens / stop_at_eos): a model "
                         "turn ends at one")
    B = input_ids.shape[0]
    if len(envs) != B or len(prompts) != B:
        raise ValueError(f"{B} prompts need {B} environments and {B} prompt texts, got {len(envs)} and {len(prompts)}")
    ids, mask = engine._check_inputs(input_ids, attention_mask, params)
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
    seed_t = torch.tensor(seed, dtype=torch.long, device=ids.device)
    rules = _Rules(frozenset(params.stop_ids()), encode, decode, max_turns, engine.vocab_size)
    stop_t = torch.tensor(sorted(rules.stop), dtype=torch.long, device=ids.device)
    rows = [_Row(env) for env in envs]
    for i, r in enumerate(rows):
        r.pending = _encode(r.env.reset(prompts[i]), encode, engine.vocab_size, f"environment of row {i}: reset")
    engine.stats.calls += 1
    outs = []
    with inference_mode(engine.module), zero3_gathered(engine.module, engine.ds_engine, engine._count_gather):
        for s in range(0, B, engine.max_batch_size):
            part = slice(s, s + engine.max_batch_size)
            outs.append(_episode_chunk(engine, ids[part], mask[part], params, rows[part], rules, stop_t, seed_t, s))
    return _join(outs, ids, rows, engine.pad_token_id)


def _episode_chunk(engine, ids, mask, params, rows, rules: "_Rules", stop_t, seed, row_offset):
    """(tokens, resp, action, logps, rewards) of one chunk, each (b, R): the lock-step loop."""
    b, P = ids.shape
    R, dev, pad = params.max_new_tokens, ids.device, engine.pad_token_id
    tokens = torch.full((b, R), pad, dtype=torch.long)  # (b, R) int64, host: the loop decides per row there
    resp = torch.zeros((b, R), dtype=torch.bool)
    action = torch.zeros((b, R), dtype=torch.bool)
    logps = torch.zeros((b, R), dtype=torch.float32)
    rewards = torch.zeros((b, R), dtype=torch.float32)
    attn = torch.ones((b, P + R), dtype=torch.long, device=dev)
    attn[:, :P] = mask
    m = mask.long()
    next_pos = m.sum(-1, keepdim=True)  # (b, 1) position of the first episode token
    noise_rows = torch.arange(b, device=dev) + row_offset
    ctx = engine._ctx
    cache = kv.make_cache(ctx.config, ctx.kv_pool)
    logits = _forward(engine, ids, attn[:, :P], m.cumsum(-1) - m, cache)  # (b, V); the one prefill
    ctx.stats.prefill_rows += b
    for t in range(R):
        tok, lp = sample_next(logits, params, step=t, stop_ids=stop_t, seed=seed, rows=noise_rows)
        tok_h, lp_h = tok.tolist(), lp.tolist()  # CPU-GPU sync point: turn ends are decided on the host
        ctx.stats.syncs += 1
        feed = []
        for i, r in enumerate(rows):
            feed.append(_advance(r, i + row_offset, t, tok_h[i], lp_h[i], tokens[i], resp[i], action[i], logps[i],
                                 rewards[i], rules))
        if all(r.finished for r in rows) or t == R - 1:
            break
        fed = torch.tensor(feed, dtype=torch.long, device=dev)[:, None]  # (b, 1)
        logits = _forward(engine, fed, attn[:, : P + t + 1], next_pos, cache)
        next_pos = next_pos + 1
    cache.reset()  # drop the views; the pool keeps the buffers
    return tokens, resp, action, logps, rewards


def _advance(r: _Row, row: int, t: int, tok: int, lp: float, tokens, resp, action, logps, rewards,
             rules: "_Rules") -> int:
    """Row ``r``'s token at column ``t`` (an environment token if one is pending, else the sampled
    one); calls the environment when a model turn ends. Returns the id to feed (pad once finished)."""
    if r.finished:
        return int(tokens[t])
    resp[t] = True
    if r.pending:  # the environment's answer, one token per step
        tok = r.pending.pop(0)
        tokens[t] = tok
        r.mark("env", t)
        if not r.pending:
            r.turn_start = t + 1
        return tok
    tokens[t], action[t], logps[t] = tok, True, lp
    r.mark("model", t)
    r.has_stop = tok in rules.stop  # False at the end: the budget cut the last model turn
    if not r.has_stop:
        return tok
    r.turns_taken += 1
    turn = Turn(ids=tuple(tokens[r.turn_start : t + 1].tolist()), text=rules.decode(tokens[r.turn_start : t + 1].tolist()),
                index=r.turns_taken - 1, stopped=True)
    where = f"environment of row {row}: step {turn.index}"
    res = check_step_result(r.env.step(turn), where=where)
    if r.last_reward_at >= 0:  # the previous step's reward was not the last one: it stays a turn reward
        rewards[r.last_reward_at] = r.final_reward
    r.final_reward, r.last_reward_at = res.reward, t
    r.done = res.done
    if res.done or r.turns_taken >= rules.max_turns:
        r.finished = True
        return tok
    r.pending = _encode(res.observation, rules.encode, rules.vocab, where)
    r.turn_start = t + 1
    return tok


def _forward(engine, ids, attn, pos, cache) -> torch.Tensor:
    kw = dict(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
    out = engine.lm(**kw)
    engine.stats.forwards += 1
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -1]  # (b, V)


def _join(outs, ids, rows, pad) -> EpisodeOutput:
    """The chunks joined and trimmed to the longest episode."""
    resp = torch.cat([o[1] for o in outs])
    R = max(1, int(resp.sum(1).max()))  # responses are prefixes
    cat = [torch.cat([o[k][:, :R] for o in outs]).to(ids.device) for k in range(5)]
    tokens, resp, action, logps, rewards = cat
    f32 = dict(dtype=torch.float32, device=ids.device)
    return EpisodeOutput(
        sequences=torch.cat([ids.long(), tokens], 1), response_mask=resp, action_mask=action, logprobs=logps,
        turn_rewards=rewards, final_reward=torch.tensor([r.final_reward for r in rows], **f32),
        done=torch.tensor([r.done for r in rows], device=ids.device),
        has_stop=torch.tensor([r.has_stop for r in rows], device=ids.device),
        turns=[r.segments for r in rows])
