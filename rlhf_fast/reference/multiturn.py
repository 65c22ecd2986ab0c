"""The slow float64 oracles of the multi-turn layout and its advantages (docs/architecture.md,
"Multi-turn episodes"), written the other way round from the fast path:

- ``episode_layout``: the episode tensors built by concatenating the transcript's segments
  (the engine instead writes one token per step);
- ``multiturn_advantages``: the model's tokens of each row compacted into a dense sequence (the
  environment's tokens removed), textbook per-token KL rewards, the score on the last model token,
  each earlier turn's reward on its turn's last token, and plain GAE on that dense sequence,
  scattered back (the fast path keeps the (B, R) layout and lets the masked GAE skip the
  environment's tokens).
"""

from __future__ import annotations

from typing import Sequence

import torch


def episode_layout(transcripts: Sequence[Sequence[tuple[str, Sequence[int]]]], width: int, pad_token_id: int):
    """(response_ids (B, width) int64, response_mask (B, width) bool, action_mask (B, width) bool)
    of transcripts: per row, ``(role, ids)`` segments in order, role "model" or "env", cut at
    ``width`` tokens; ``pad_token_id`` after the end."""
    B = len(transcripts)
    ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    resp = torch.zeros((B, width), dtype=torch.bool)
    action = torch.zeros((B, width), dtype=torch.bool)
    for i, segments in enumerate(transcripts):
        row, roles = [], []
        for role, seg in segments:
            if role not in ("model", "env"):
                raise ValueError(f"row {i}: a segment's role must be 'model' or 'env', got {role!r}")
            row.extend(int(t) for t in seg)
            roles.extend([role == "model"] * len(seg))
        row, roles = row[:width], roles[:width]
        n = len(row)
        ids[i, :n] = torch.tensor(row, dtype=torch.long)
        resp[i, :n] = True
        action[i, :n] = torch.tensor(roles, dtype=torch.bool)
    return ids, resp, action


def multiturn_advantages(scores, turn_rewards, logprobs, ref_logprobs, values, action_mask, *, kl_coef: float,
                         gamma: float, lam: float):
    """(rewards, advantages, returns), each (B, R) float64, 0 off the model's tokens.

    scores (B,): the episode's final reward, on the row's last model token. turn_rewards (B, R): the
    earlier turns' rewards (read on model tokens only). logprobs / ref_logprobs / values (B, R): on
    model tokens. Per model token, reward = -kl_coef * (logprob - ref_logprob) (k1) + its turn
    reward (+ the score on the last one); GAE over the model tokens alone, in order, as if the
    environment's tokens were not there: delta_k = r_k + gamma V_{k+1} - V_k, A_k = delta_k + gamma
    lam A_{k+1}, V and A past the last model token 0; returns = A + V."""
    B, R = action_mask.shape
    f = dict(dtype=torch.float64)
    rewards, adv, ret = torch.zeros(B, R, **f), torch.zeros(B, R, **f), torch.zeros(B, R, **f)
    for i in range(B):
        cols = [t for t in range(R) if bool(action_mask[i, t])]
        if not cols:
            continue
        r = [-kl_coef * (float(logprobs[i, t]) - float(ref_logprobs[i, t])) + float(turn_rewards[i, t]) for t in cols]
        r[-1] += float(scores[i])
        v = [float(values[i, t]) for t in cols]
        a, nxt_a, nxt_v = [0.0] * len(cols), 0.0, 0.0
        for k in reversed(range(len(cols))):
            delta = r[k] + gamma * nxt_v - v[k]
            nxt_a = delta + gamma * lam * nxt_a
            nxt_v = v[k]
            a[k] = nxt_a
        for k, t in enumerate(cols):
            rewards[i, t], adv[i, t], ret[i, t] = r[k], a[k], a[k] + v[k]
    return rewards, adv, ret
