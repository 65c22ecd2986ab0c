"""The rollout stage of PPO: prompts -> generator -> truncation -> scores -> a typed ``Rollout``.

One call of ``RolloutStage.collect`` (docs/architecture.md, "One PPO iteration"):

    PromptSchedule.batch      this rank's prompts of the iteration: (b, Q) left padded; the global
                              order depends on (seed, epoch) only; each prompt repeated
                              ``samples_per_prompt`` times (grpo / rloo groups)
    RolloutStage.respond      Generator.generate -> (b, R) responses padded to max_new_tokens
                              (the same R on every rank: rollouts are gathered), truncated after
                              the first stop token (the EOS trick), with the engine's log-probs
    Scorer.__call__           reward model on query + response, or a reward function on texts
    missing-stop penalty      algos.apply_missing_stop_penalty
    -> Rollout(query, response, masks, scores, group_ids) and RolloutExtras (has_stop, the
       engine's log-probs, the raw scores) for the health metrics.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from rlhf_fast import algos
from rlhf_fast.algos import Rollout
from rlhf_fast.config import PPOConfig
from rlhf_fast.engine import SamplingParams
from rlhf_fast.trainers.common import epoch_order

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


# ---- reward functions -------------------------------------------------------------------------------


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


# ---- typed results ------------------------------------------------------------------------------------


@dataclass
class Responses:
    """What ``RolloutStage.respond`` returns for b prompts (R = max_new_tokens).

    query_ids / query_mask: (b, Q) long / bool, the left-padded prompts. response_ids /
    response_mask: (b, R) the training view (``generation.after_stop``: padded and masked after the
    first stop token, or every sampled token). has_stop: (b,) bool (always True without stop
    tokens: fixed-length responses). logprobs: (b, R) float32, the engine's log-probs of the
    sampled tokens (0 past R_generated). score_ids / score_mask: (b, R) the scoring view, truncated
    after the first stop token (the EOS trick) in either mode (``algos.postprocess_responses``)."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    has_stop: torch.Tensor
    logprobs: torch.Tensor
    score_ids: torch.Tensor
    score_mask: torch.Tensor


@dataclass
class RolloutExtras:
    """Per-row facts of this rank's rollout that the update does not use but the metrics do:
    has_stop (b,) bool, engine_logprobs (b, R) float32, raw_scores (b,) float32 (before the
    missing-stop penalty)."""

    has_stop: torch.Tensor
    engine_logprobs: torch.Tensor
    raw_scores: torch.Tensor


# ---- the parts -------------------------------------------------------------------------------------


class PromptSchedule:
    """Which prompts rank ``rank`` rolls out at each iteration: global batches of
    ``rollout_batch_size`` prompts in a seeded order per epoch (the same on every rank), rank r
    taking the r-th slice, each prompt repeated ``samples_per_prompt`` times (a group)."""

    def __init__(self, prompts, collate, *, seed: int, global_prompts: int, samples_per_prompt: int, rank: int,
                 world_size: int):
        self.prompts, self.collate, self.seed = prompts, collate, seed
        self.global_prompts, self.samples_per_prompt = global_prompts, samples_per_prompt
        self.local_prompts = global_prompts // world_size
        self.rank = rank

    def batch(self, iteration: int) -> dict:
        """This rank's prompts of ``iteration``: the collated batch and their ``prompts`` texts."""
        n, G = len(self.prompts), self.global_prompts
        start = iteration * G
        idx: list[int] = []
        while len(idx) < G:
            epoch, k = divmod(start + len(idx), n)
            order = epoch_order(n, self.seed, epoch)
            idx.extend(order[k : k + G - len(idx)].tolist())
        mine = idx[self.rank * self.local_prompts : (self.rank + 1) * self.local_prompts]
        mine = [i for i in mine for _ in range(self.samples_per_prompt)]  # grpo / rloo groups
        batch = self.collate([self.prompts[i] for i in mine])
        batch["prompts"] = [self.prompts.prompts[i] for i in mine]
        return batch


class Scorer:
    """(b,) float32 scores of responses: the reward model on query + response ids (in batches of
    ``batch_size``), or a reward function on the decoded texts."""

    def __init__(self, *, reward_model=None, reward_fn: Optional[RewardFn] = None, tokenizer, batch_size: int):
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("Scorer needs exactly one of reward_model and reward_fn")
        self.reward_model, self.reward_fn = reward_model, reward_fn
        self.tokenizer, self.batch_size = tokenizer, batch_size

    @torch.no_grad()
    def __call__(self, r: Responses, prompts: Sequence[str], *, index_offset: int = 0,
                 eval_rows: Optional[list[int]] = None) -> torch.Tensor:
        """``eval_rows``: the eval prompts' indices (for error messages); else rows are numbered
        from ``index_offset``."""
        if self.reward_model is not None:
            seq = torch.cat([r.query_ids, r.score_ids], 1)  # (b, Q + R)
            att = torch.cat([r.query_mask, r.score_mask], 1).long()
            bs = self.batch_size
            return torch.cat([self.reward_model(seq[s : s + bs], att[s : s + bs]).scores
                              for s in range(0, seq.shape[0], bs)]).float()
        pad = self.tokenizer.pad_token_id
        texts = self.tokenizer.batch_decode(torch.where(r.score_mask, r.score_ids, pad), skip_special_tokens=True)
        dev = r.response_ids.device
        if eval_rows is not None:
            return call_reward_function(self.reward_fn, prompts, texts, indices=eval_rows, what="eval prompt").to(dev)
        return call_reward_function(self.reward_fn, prompts, texts, index_offset=index_offset).to(dev)


class RolloutStage:
    """Prompts -> generator -> truncation -> scores -> this rank's ``Rollout`` (see the module
    docstring). ``generator``: a ``rlhf_fast.engine.Generator`` (the hybrid engine on the live
    policy); ``stop_token_ids``: the resolved ``generation.stop_tokens``."""

    def __init__(self, cfg: PPOConfig, *, generator, schedule: PromptSchedule, scorer: Scorer, tokenizer,
                 stop_token_ids: Sequence[int], device, rank: int):
        self.cfg, self.gen, self.schedule, self.scorer = cfg, generator, schedule, scorer
        self.tokenizer, self.stop_token_ids, self.device, self.rank = tokenizer, list(stop_token_ids), device, rank

    def sampling(self, seed: int) -> SamplingParams:
        g = self.cfg.generation
        return SamplingParams(
            max_new_tokens=g.max_new_tokens, do_sample=g.do_sample, temperature=g.temperature, top_k=g.top_k,
            top_p=g.top_p, min_new_tokens=g.min_new_tokens,
            eos_token_id=self.tokenizer.eos_token_id if g.stop_at_eos else None,
            stop_token_ids=tuple(self.stop_token_ids) if g.stop_during_generation else (), seed=seed)

    def truncation_ids(self) -> list[int]:
        """The tokens a response is truncated after: the stop tokens, and EOS with ``stop_at_eos``."""
        ids = list(self.stop_token_ids)
        if self.cfg.generation.stop_at_eos:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    def respond(self, batch: dict, seed: int) -> Responses:
        """Generate, pad to max_new_tokens, then ``algos.postprocess_responses``: the scoring view
        (truncated after the first stop token: the EOS trick) and the training view
        (``generation.after_stop``)."""
        ids = batch["input_ids"].to(self.device)  # (b, Q)
        mask = batch["attention_mask"].to(self.device)
        out = self.gen.generate(ids, mask, self.sampling(seed))
        R, pad_id = self.cfg.generation.max_new_tokens, self.tokenizer.pad_token_id
        pad = R - out.response_mask.shape[1]  # same R on every rank (the rollouts are gathered)
        resp = torch.nn.functional.pad(out.responses, (0, pad), value=pad_id)  # (b, R)
        rmask = torch.nn.functional.pad(out.response_mask, (0, pad), value=False)
        gen_lp = torch.nn.functional.pad(out.logprobs, (0, pad), value=0.0)
        g = self.cfg.generation
        post = algos.postprocess_responses(resp, rmask, self.truncation_ids(), pad_token_id=pad_id,
                                           min_length=g.truncate_min_length, after_stop=g.after_stop)
        return Responses(ids, mask.bool(), post.response_ids, post.train_mask, post.has_stop, gen_lp,
                         score_ids=post.score_ids, score_mask=post.score_mask)

    def collect(self, iteration: int, seed: int) -> tuple[Rollout, RolloutExtras]:
        """This rank's rollout of ``iteration``: (b,) rows, b = local prompts x samples_per_prompt."""
        batch = self.schedule.batch(iteration)
        r = self.respond(batch, seed)
        return self.score(r, batch["prompts"])

    def score(self, r: Responses, prompts: Sequence[str]) -> tuple[Rollout, RolloutExtras]:
        cfg, spp = self.cfg, self.cfg.samples_per_prompt
        raw = self.scorer(r, prompts, index_offset=self.rank * self.schedule.local_prompts * spp)  # (b,)
        scores = algos.apply_missing_stop_penalty(raw.clone(), r.has_stop, mode=cfg.generation.missing_stop_penalty,
                                                  value=cfg.generation.missing_stop_value)
        groups = None
        if spp > 1:
            groups = algos.contiguous_group_ids(r.response_ids.shape[0], spp, r.response_ids.device)
            groups = groups + self.rank * self.schedule.local_prompts
        rollout = Rollout(r.query_ids, r.query_mask, r.response_ids, r.response_mask, scores, group_ids=groups)
        return rollout, RolloutExtras(has_stop=r.has_stop, engine_logprobs=r.logprobs, raw_scores=raw)
