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

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from rlhf_fast import algos
from rlhf_fast.algos import Rollout
from rlhf_fast.config import PPOConfig
from rlhf_fast.engine import SamplingParams
from rlhf_fast.envs.registry import import_user_module
from rlhf_fast.trainers.data_order import epoch_order
from rlhf_fast.trainers.ppo_trim import trim_columns

RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


# ---- reward functions -------------------------------------------------------------------------------


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
        fn = getattr(import_user_module(module), name)
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
    episodes: Optional["EpisodeFacts"] = None
    """multi-turn only (``ppo.env``): the masks and rewards of the episodes."""


@dataclass
class EpisodeFacts:
    """What multi-turn episodes add to ``Responses`` (b rows, R = max_new_tokens; ``engine/episodes.py``):
    action_mask (b, R) bool, the model's tokens (``response_mask`` holds the environment's too);
    turn_rewards (b, R) float32; final_reward (b,) float32 (the episode's score); done (b,) bool;
    turns: per row the segments ``{"role", "start", "end"}`` for the sample log."""

    action_mask: torch.Tensor
    turn_rewards: torch.Tensor
    final_reward: torch.Tensor
    done: torch.Tensor
    turns: list


@dataclass
class RolloutExtras:
    """Per-row facts of this rank's rollout that the update does not use but the metrics do:
    has_stop (b,) bool, engine_logprobs (b, R) float32, raw_scores (b,) float32 (before the
    missing-stop penalty); prompts (b texts), score_ids / score_mask (b, R): the responses as
    scored (the sample log shows them)."""

    has_stop: torch.Tensor
    engine_logprobs: torch.Tensor
    raw_scores: torch.Tensor
    prompts: Optional[list] = None
    score_ids: Optional[torch.Tensor] = None
    score_mask: Optional[torch.Tensor] = None
    turns: Optional[list] = None
    """multi-turn: per row the episode's segments (``EpisodeFacts.turns``), for the sample log."""
    sampling_rounds: int = 1
    """rollout rounds this iteration took (dynamic sampling; 1 without it)."""
    informative_frac: float = 1.0
    """fraction of the first round's rows whose group's scores differ (dynamic sampling's filter)."""


@dataclass
class PhaseTimer:
    """``with timer("generate"): ...`` adds the block's wall seconds to ``seconds["generate"]``."""

    seconds: dict

    def __call__(self, name: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


def iteration_seed(seed: int, iteration: int, rank: int) -> int:
    """The sampling seed of one rank's rollout of ``iteration`` (a function of these only, so a
    resumed run and a rollout worker draw what the uninterrupted trainer would)."""
    return seed * 1_000_003 + iteration * 7919 + rank * 100003  # rank stride: N details #6


# ---- the parts -------------------------------------------------------------------------------------


class PromptSchedule:
    """Which prompts rank ``rank`` rolls out at each iteration: global batches of
    ``rollout_batch_size`` prompts in a seeded order per epoch (the same on every rank), rank r
    taking the r-th slice, each prompt repeated ``samples_per_prompt`` times (a group)."""

    def __init__(self, prompts, collate, *, seed: int, global_prompts: int, samples_per_prompt: int, rank: int,
                 world_size: int, draws_per_iteration: int = 1):
        self.prompts, self.collate, self.seed = prompts, collate, seed
        self.global_prompts, self.samples_per_prompt = global_prompts, samples_per_prompt
        self.local_prompts = global_prompts // world_size
        self.rank = rank
        self.draws_per_iteration = draws_per_iteration

    def batch(self, iteration: int, draw: int = 0) -> dict:
        """This rank's prompts of ``iteration``: the collated batch and their ``prompts`` texts.
        ``draw``: the rollout round inside the iteration (dynamic sampling draws up to
        ``draws_per_iteration`` batches per iteration, each from the next prompts of the order)."""
        if not 0 <= draw < self.draws_per_iteration:
            raise ValueError(f"draw {draw} outside [0, {self.draws_per_iteration})")
        n, G = len(self.prompts), self.global_prompts
        start = (iteration * self.draws_per_iteration + draw) * G
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

    def __init__(self, *, reward_model=None, reward_fn: Optional[RewardFn] = None, tokenizer, batch_size: int,
                 trim_padding: bool = False):
        if (reward_model is None) == (reward_fn is None):
            raise ValueError("Scorer needs exactly one of reward_model and reward_fn")
        self.reward_model, self.reward_fn = reward_model, reward_fn
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.trim_padding = trim_padding  # each reward-model batch on its attended columns (trainers/ppo_trim.py)

    @torch.no_grad()
    def __call__(self, r: Responses, prompts: Sequence[str], *, index_offset: int = 0,
                 eval_rows: Optional[list[int]] = None) -> torch.Tensor:
        """``eval_rows``: the eval prompts' indices (for error messages); else rows are numbered
        from ``index_offset``."""
        if self.reward_model is not None:
            seq = torch.cat([r.query_ids, r.score_ids], 1)  # (b, Q + R)
            att = torch.cat([r.query_mask, r.score_mask], 1).long()
            bs = self.batch_size
            chunks = [(seq[s : s + bs], att[s : s + bs]) for s in range(0, seq.shape[0], bs)]
            if self.trim_padding:
                chunks = [trim_columns(*c) for c in chunks]
            return torch.cat([self.reward_model(*c).scores for c in chunks]).float()
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

    def __init__(self, cfg: PPOConfig, *, generator, schedule: PromptSchedule, scorer: Optional[Scorer], tokenizer,
                 stop_token_ids: Sequence[int], device, rank: int, env_factory=None):
        if (scorer is None) == (env_factory is None):
            raise ValueError("RolloutStage needs a scorer (single-turn) or an environment factory (ppo.env), not both")
        self.cfg, self.gen, self.schedule, self.scorer = cfg, generator, schedule, scorer
        self.env_factory = env_factory  # ppo.env: one fresh environment per episode
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
        if self.env_factory is not None:
            return self._play(ids, mask, batch["prompts"], seed)
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

    def _play(self, ids, mask, prompts: Sequence[str], seed: int) -> Responses:
        """Multi-turn episodes (``ppo.env``; docs/architecture.md, "Multi-turn episodes"), padded to
        R = max_new_tokens. The engine's ids are kept as they are (token in, token out); the episode
        as scored is the episode itself (the environment scored it turn by turn)."""
        tok = self.tokenizer
        out = self.gen.run_episodes(ids, mask, self.sampling(seed), envs=[self.env_factory() for _ in prompts],
                                    prompts=list(prompts), encode=lambda s: tok.encode(s, add_special_tokens=False),
                                    decode=lambda t: tok.decode(t, skip_special_tokens=False),
                                    max_turns=self.cfg.env_max_turns)
        R, pad_id = self.cfg.generation.max_new_tokens, tok.pad_token_id
        pad = R - out.response_mask.shape[1]
        P = lambda t, v: F.pad(t, (0, pad), value=v)  # noqa: E731  (b, r) -> (b, R)
        resp, rmask = P(out.responses, pad_id), P(out.response_mask, False)
        facts = EpisodeFacts(P(out.action_mask, False), P(out.turn_rewards, 0.0), out.final_reward, out.done, out.turns)
        return Responses(ids, mask.bool(), resp, rmask, out.has_stop, P(out.logprobs, 0.0), score_ids=resp,
                         score_mask=rmask, episodes=facts)

    def collect(self, iteration: int, seed: int, timer=None) -> tuple[Rollout, RolloutExtras]:
        """This rank's rollout of ``iteration``: (b,) rows, b = local prompts x samples_per_prompt.
        With ``algo.dynamic_sampling`` (DAPO) the groups whose scores are all equal are dropped and
        further rounds (fresh prompts, seed + round) refill the batch, whole groups only; after
        ``algo.max_sampling_rounds`` rounds the rest is filled with dropped groups of the last
        round. ``timer``: a context-manager factory timing "generate" and "score"."""
        timer = timer or (lambda name: contextlib.nullcontext())
        hp, b = self.cfg.algo, self.schedule.local_prompts * self.cfg.samples_per_prompt
        kept: list[tuple[Rollout, RolloutExtras]] = []
        have, rounds, first_frac = 0, 0, 1.0
        while rounds < (hp.max_sampling_rounds if hp.dynamic_sampling else 1):
            with timer("generate"):
                batch = self.schedule.batch(iteration, rounds)
                r = self.respond(batch, seed + rounds * 104729)  # a fresh seed per round
            with timer("score"):
                rollout, extras = self.score(r, batch["prompts"])
            rounds += 1
            if not hp.dynamic_sampling:
                return rollout, extras
            keep = algos.informative_groups(rollout.scores, rollout.group_ids)  # (b,) bool, whole groups
            first_frac = float(keep.float().mean()) if rounds == 1 else first_frac
            take = keep.nonzero().flatten()[: b - have]
            if have + int(keep.sum()) >= b or rounds == hp.max_sampling_rounds:  # fill up with dropped groups
                take = torch.cat([take, (~keep).nonzero().flatten()])[: b - have]
            kept.append(_select_rows(rollout, extras, take))
            have += take.numel()
            if _all_ranks_done(have >= b, rollout.scores.device):
                break
        return self._join(kept, rounds, first_frac)

    def _join(self, parts, rounds: int, first_frac: float) -> tuple[Rollout, RolloutExtras]:
        """One rollout of whole groups from several rounds, with fresh contiguous group ids."""
        Q = max(p[0].query_ids.shape[1] for p in parts)
        pad_id = self.tokenizer.pad_token_id
        rolls = [p[0].replace(query_ids=F.pad(p[0].query_ids, (Q - p[0].query_ids.shape[1], 0), value=pad_id),
                              query_mask=F.pad(p[0].query_mask, (Q - p[0].query_mask.shape[1], 0), value=False))
                 for p in parts]
        cat = {k: torch.cat([getattr(r, k) for r in rolls]) for k in ("query_ids", "query_mask", "response_ids",
                                                                    "response_mask", "scores")}
        spp, n = self.cfg.samples_per_prompt, cat["scores"].shape[0]
        groups = algos.contiguous_group_ids(n, spp, cat["scores"].device) + self.rank * self.schedule.local_prompts
        rollout = Rollout(cat["query_ids"], cat["query_mask"], cat["response_ids"], cat["response_mask"], cat["scores"],
                          group_ids=groups)
        extras = RolloutExtras(has_stop=torch.cat([p[1].has_stop for p in parts]),
                               engine_logprobs=torch.cat([p[1].engine_logprobs for p in parts]),
                               raw_scores=torch.cat([p[1].raw_scores for p in parts]), sampling_rounds=rounds,
                               informative_frac=first_frac, prompts=[t for p in parts for t in p[1].prompts],
                               score_ids=torch.cat([p[1].score_ids for p in parts]),
                               score_mask=torch.cat([p[1].score_mask for p in parts]))
        return rollout, extras

    def score(self, r: Responses, prompts: Sequence[str]) -> tuple[Rollout, RolloutExtras]:
        cfg, spp = self.cfg, self.cfg.samples_per_prompt
        ep = r.episodes
        if ep is not None:  # multi-turn: the environment's last reward is the score
            raw = ep.final_reward.to(r.response_ids.device)  # (b,)
        else:
            raw = self.scorer(r, prompts, index_offset=self.rank * self.schedule.local_prompts * spp)  # (b,)
        scores = algos.apply_missing_stop_penalty(raw.clone(), r.has_stop, mode=cfg.generation.missing_stop_penalty,
                                                  value=cfg.generation.missing_stop_value)
        if cfg.algo.overlong_buffer_fraction is not None:  # DAPO soft overlong punishment (algos/critic_free.py)
            R = cfg.generation.max_new_tokens
            buffer = max(1, round(cfg.algo.overlong_buffer_fraction * R))
            scores = scores + algos.overlong_penalty(r.response_mask.sum(-1), max_length=R, buffer=buffer,
                                                     factor=cfg.algo.overlong_penalty_factor).to(scores.device)
        groups = None
        if spp > 1:
            groups = algos.contiguous_group_ids(r.response_ids.shape[0], spp, r.response_ids.device)
            groups = groups + self.rank * self.schedule.local_prompts
        rollout = Rollout(r.query_ids, r.query_mask, r.response_ids, r.response_mask, scores, group_ids=groups,
                          action_mask=None if ep is None else ep.action_mask,
                          turn_rewards=None if ep is None else ep.turn_rewards)
        return rollout, RolloutExtras(has_stop=r.has_stop, engine_logprobs=r.logprobs, raw_scores=raw,
                                      prompts=list(prompts), score_ids=r.score_ids, score_mask=r.score_mask,
                                      turns=None if ep is None else ep.turns)


def _select_rows(rollout: Rollout, extras: RolloutExtras, rows: torch.Tensor) -> tuple[Rollout, RolloutExtras]:
    rows = rows.sort().values  # keep the groups contiguous, in their order
    r = Rollout(rollout.query_ids[rows], rollout.query_mask[rows], rollout.response_ids[rows],
                rollout.response_mask[rows], rollout.scores[rows])
    return r, RolloutExtras(has_stop=extras.has_stop[rows], engine_logprobs=extras.engine_logprobs[rows],
                            raw_scores=extras.raw_scores[rows], prompts=[extras.prompts[i] for i in rows.tolist()],
                            score_ids=extras.score_ids[rows], score_mask=extras.score_mask[rows])


def _all_ranks_done(done: bool, device) -> bool:
    """Every rank has filled its batch (all ranks run the same number of rounds: generation under
    ZeRO-3 gathers parameters collectively)."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return done
    flag = torch.tensor([0.0 if done else 1.0], device=device)
    torch.distributed.all_reduce(flag)  # host sync: the loop's exit condition
    return float(flag) == 0.0
