"""Response post-processing before scoring: truncation after the first stop token (the EOS
trick, N+ TL;DR; "N details" #14's '.' after token 16), detection of a missing stop token, the
missing-stop penalty (registry: "replace" the score, N+ / lm-human-preferences; "subtract"
from it, TRL's ``missing_eos_penalty``), and which tokens PPO trains on after the stop token
(``AFTER_STOP``: "masked", N+ TL;DR; "trained", lm-human-preferences)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from rlhf_fast.algos.registry import Registry

Tensor = torch.Tensor


@dataclass(frozen=True)
class Truncation:
    """response_ids: (B, R), pad after the stop token. response_mask: (B, R) bool, True up to and
    including the stop token (all valid input tokens when there is none). has_stop: (B,) bool.
    stop_index: (B,) long, the stop token's position, -1 when there is none."""

    response_ids: Tensor
    response_mask: Tensor
    has_stop: Tensor
    stop_index: Tensor


def first_stop_index(
    response_ids: Tensor, stop_token_ids: Sequence[int] | int, *, min_length: int = 0, response_mask: Optional[Tensor] = None
) -> Tensor:
    """(B,) long: position of the first stop token at index >= ``min_length`` (0-based) among the
    valid tokens, -1 when there is none. ``min_length=16`` with '.' is lm-human-preferences'
    ``truncate_after`` ("N details" #14)."""
    if response_ids.dim() != 2:
        raise ValueError(f"response_ids must be (B, R), got shape {tuple(response_ids.shape)}")
    stops = torch.as_tensor(
        [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids),
        dtype=response_ids.dtype, device=response_ids.device,
    )
    if stops.numel() == 0:
        raise ValueError("stop_token_ids must name at least one token")
    R = response_ids.shape[-1]
    pos = torch.arange(R, device=response_ids.device)
    is_stop = torch.isin(response_ids, stops) & (pos >= min_length)
    if response_mask is not None:
        is_stop &= response_mask.bool()
    first = torch.where(is_stop, pos, R).amin(-1) if R > 0 else torch.full(response_ids.shape[:1], R, device=pos.device)
    return torch.where(first < R, first, -1)


def truncate_at_stop(
    response_ids: Tensor,
    stop_token_ids: Sequence[int] | int,
    *,
    pad_token_id: int,
    min_length: int = 0,
    response_mask: Optional[Tensor] = None,
) -> Truncation:
    """Keep each response up to and including its first stop token (at index >= ``min_length``)
    and replace what follows with ``pad_token_id``; rows without one are kept whole (the EOS
    trick: sample a fixed number of tokens, truncate afterwards; N+ TL;DR). ``response_mask``
    (B, R): already-invalid tokens (e.g. the generator's own padding) stay invalid."""
    stop = first_stop_index(response_ids, stop_token_ids, min_length=min_length, response_mask=response_mask)
    has_stop = stop >= 0
    R = response_ids.shape[-1]
    last = torch.where(has_stop, stop, R - 1)
    keep = torch.arange(R, device=response_ids.device) <= last.unsqueeze(-1)
    if response_mask is not None:
        keep &= response_mask.bool()
    ids = torch.where(keep, response_ids, torch.full_like(response_ids, pad_token_id))
    return Truncation(response_ids=ids, response_mask=keep, has_stop=has_stop, stop_index=stop)


#: what happens to the sampled tokens after the first stop token (``postprocess_responses``)
@dataclass(frozen=True)
class AfterStop:
    """trains_after_stop: the training view keeps every sampled token (the score on the last one);
    False: it is the truncated response (the score on the stop token)."""

    trains_after_stop: bool


AFTER_STOP: Registry[AfterStop] = Registry("after-stop treatment")
AFTER_STOP.register("masked")(AfterStop(trains_after_stop=False))
AFTER_STOP.register("trained")(AfterStop(trains_after_stop=True))


@dataclass(frozen=True)
class PostprocessedResponses:
    """One rollout's responses, split into what the reward sees and what PPO trains on.

    response_ids: (B, R) long, the ids PPO trains on: the sampled ids ("trained") or the ids
        padded after the stop token ("masked").
    train_mask: (B, R) bool, the tokens that get a KL penalty and enter GAE, whitening and the
        losses ("trained": every sampled token; "masked": up to and including the stop token).
    score_ids: (B, R) long, the response the reward model / function scores: padded after the
        stop token in both modes (lm-human-preferences ``postprocess_fn_from_hparams``; N+
        ``truncate_response``).
    score_mask: (B, R) bool, True on ``score_ids``' tokens up to and including the stop token.
    has_stop: (B,) bool, a stop token at index >= ``min_length`` was sampled (the missing-stop
        penalty applies to the others).
    score_index: (B,) long, where the sequence score lands in the per-token rewards: the last
        True of ``train_mask`` (the last sampled token, or the stop token); -1 for an empty row.
    """

    response_ids: Tensor
    train_mask: Tensor
    score_ids: Tensor
    score_mask: Tensor
    has_stop: Tensor
    score_index: Tensor


def last_true_index(mask: Tensor) -> Tensor:
    """(B,) long: index of the last True of each row of a (B, R) mask, -1 for an all-False row
    (where ``shape_rewards`` puts the score)."""
    R = mask.shape[-1]
    pos = torch.arange(R, device=mask.device)
    return torch.where(mask.bool(), pos, -1).amax(-1) if R > 0 else torch.full(mask.shape[:1], -1, device=mask.device)


def postprocess_responses(
    response_ids: Tensor,
    response_mask: Tensor,
    stop_token_ids: Sequence[int],
    *,
    pad_token_id: int,
    min_length: int = 0,
    after_stop: str = "masked",
) -> PostprocessedResponses:
    """Split sampled responses into the scoring view and the training view.

    response_ids / response_mask: (B, R), the generator's output (mask False on its own padding
    after a row it stopped). ``stop_token_ids`` empty: no truncation, every row "has" a stop
    (fixed-length responses, "N details" #4). Otherwise the scoring view is
    ``truncate_at_stop`` (stop tokens at index >= ``min_length``) and the training view is:

    - "masked" (N+ TL;DR, vwxyzjn/summarize_from_feedback_details ``ppo.py``: tokens after the
      EOS are padded and masked; TRL): the truncated response; the score lands on the stop token.
    - "trained" (openai/lm-human-preferences ``train_policy.py``: ``make_score_fn`` truncates
      only the copy it scores and ``penalize``s it; ``PPOTrainer.step`` / ``loss`` run
      ``compute_rewards`` — ``rewards[:, -1] += scores`` — GAE, whitening and the losses over
      every sampled token; likewise vwxyzjn/lm-human-preference-details
      ``train_policy_accelerate.py``): every sampled token; the score lands on the last one.
    """
    if after_stop not in AFTER_STOP:
        raise ValueError(f"after_stop must be one of {AFTER_STOP.names()}, got {after_stop!r}")
    if tuple(response_mask.shape) != tuple(response_ids.shape):
        raise ValueError(f"response_mask must have the shape of response_ids {tuple(response_ids.shape)}, "
                         f"got {tuple(response_mask.shape)}")
    mask = response_mask.bool()
    stops = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids)
    if not stops:
        ids = torch.where(mask, response_ids, torch.full_like(response_ids, pad_token_id))
        has_stop = torch.ones(response_ids.shape[0], dtype=torch.bool, device=response_ids.device)
        return PostprocessedResponses(ids, mask, ids, mask, has_stop, last_true_index(mask))
    t = truncate_at_stop(response_ids, stops, pad_token_id=pad_token_id, min_length=min_length, response_mask=mask)
    if AFTER_STOP[after_stop].trains_after_stop:
        train_ids, train_mask = response_ids, mask
    else:
        train_ids, train_mask = t.response_ids, t.response_mask
    return PostprocessedResponses(train_ids, train_mask, t.response_ids, t.response_mask, t.has_stop,
                                  last_true_index(train_mask))


MISSING_STOP_PENALTIES: Registry[Callable[[Tensor, Tensor, float], Tensor]] = Registry("missing-stop penalty")


@MISSING_STOP_PENALTIES.register("replace")
def _replace(scores: Tensor, has_stop: Tensor, value: float) -> Tensor:
    """score = value (-1 in lm-human-preferences and N+ TL;DR) for rows without a stop token."""
    return torch.where(has_stop, scores, torch.full_like(scores, value))


@MISSING_STOP_PENALTIES.register("subtract")
def _subtract(scores: Tensor, has_stop: Tensor, value: float) -> Tensor:
    """score -= value for rows without a stop token (TRL ``missing_eos_penalty``)."""
    return torch.where(has_stop, scores, scores - value)


def apply_missing_stop_penalty(scores: Tensor, has_stop: Tensor, *, mode: Optional[str], value: float) -> Tensor:
    """Penalise the (B,) ``scores`` of rows whose ``has_stop`` is False; ``mode=None``: unchanged."""
    if mode is None:
        return scores
    if tuple(has_stop.shape) != tuple(scores.shape):
        raise ValueError(f"has_stop must have the shape of scores {tuple(scores.shape)}, got {tuple(has_stop.shape)}")
    return MISSING_STOP_PENALTIES[mode](scores, has_stop.bool(), float(value))


# ---- where the score lands, and the tokens the critic learns (``algo.score_position``) ------------


@dataclass(frozen=True)
class ScorePosition:
    """A registered score position (``PPOHyperParams.score_position``). ``value_mask(mask)``: the
    (B, R) tokens the score and the values live on, given the (B, R) trained-token ``mask`` (a
    valid prefix of each row): the score lands on its last token, GAE runs over it (values 0
    after it), the value loss covers it, while the KL penalty, the advantage whitening and the
    policy loss stay on ``mask``. ``extra_columns``: response columns past a row's last trained
    token the forwards keep (``trainers/ppo_trim.py``), so the values there exist."""

    value_mask: Callable[[Tensor], Tensor]
    extra_columns: int


def _after_stop_mask(mask: Tensor) -> Tensor:
    """``mask`` plus the first position after each row's last valid token, where there is one."""
    m = mask.bool()
    out = m.clone()
    out[..., 1:] |= m[..., :-1]
    return out


SCORE_POSITIONS: Registry[ScorePosition] = Registry("score position")
# "stop": the score on the last trained token (the EOS under the EOS trick), the values trained on
# the trained tokens (TRL's later trainers, OpenRLHF, MOSS-RLHF: ``penalized_rewards[-1] += reward``).
SCORE_POSITIONS.register("stop")(ScorePosition(value_mask=lambda mask: mask, extra_columns=0))
# "after_stop": the score one token past the EOS (the first padding token) when the row has room,
# the values trained there too: summarize_from_feedback_details ppo.py (``sequence_lengths_p1``,
# ``padding_mask_p1``, ``actual_end``), TRL's PPOTrainer (TRL #3750). A row without room (its
# last trained token is the last column) keeps the score on that token, as ``actual_end`` does.
SCORE_POSITIONS.register("after_stop")(ScorePosition(value_mask=_after_stop_mask, extra_columns=1))
