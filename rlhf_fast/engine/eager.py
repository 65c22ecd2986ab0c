"""The eager decode path (``decode="eager"``): a Python loop over steps on the engine's KV buffers.

One prefill of the left-padded prompts with position ids ``cumsum(mask) - mask`` ("N
Implementation Details" #3), then one token per step from the engine-owned KV buffers
(``cache.KVBufferPool``): attention reads only the filled prefix. The token choice stays on the
device; the only host syncs are the all-finished check every ``sync_every`` steps, where finished
rows are also compacted away (their rows of the KV cache dropped) so they stop costing compute.
Works with any Hugging Face causal LM, sliding-window and ZeRO-3 models included; the fallback
of the compiled path (``compiled.py``). Identical consecutive prompts (a group of samples) share
one prefill (``prefix_share.py``; ``HybridEngine(share_prefill=False)`` turns it off).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rlhf_fast.engine import cache as kv
from rlhf_fast.engine import prefix_share
from rlhf_fast.engine.generator import DECODERS, AutoPreference, DecoderContext
from rlhf_fast.engine.sampling import SamplingParams, sample_next


@dataclass
class _Live:
    """The loop's per-row state for the rows still in the batch (b <= B after compactions)."""

    finished: torch.Tensor  # (b,) bool: the row emitted a stop token
    attn: torch.Tensor  # (b, P + R) int64: key mask over prompt and response positions
    next_pos: torch.Tensor  # (b, 1) int64: position id of the next token
    noise_rows: torch.Tensor  # (b,) int64: row ids of the uniform draws (the rows' indices in the call)
    rows: Optional[torch.Tensor] = None  # (b,) int64: batch row -> chunk row, once rows were compacted away

    def select(self, keep: torch.Tensor) -> None:
        """Keeps the rows ``keep`` (indices into the current batch)."""
        self.rows = keep if self.rows is None else self.rows[keep]
        self.finished, self.attn = self.finished[keep], self.attn[keep]
        self.next_pos, self.noise_rows = self.next_pos[keep], self.noise_rows[keep]


@DECODERS.register("eager")
class EagerDecoder:
    """The step loop with filled-prefix attention and compaction of finished rows (module docstring)."""

    auto = AutoPreference(devices=("*",), rank=0)  # decode="auto": anywhere; the others' fallback

    def __init__(self, ctx: DecoderContext):
        self.ctx = ctx
        self._logits_to_keep = ctx.logits_to_keep

    @classmethod
    def unsupported(cls, ctx: DecoderContext) -> Optional[str]:
        return None  # any causal LM: the cache is HF's own for every layer the pool does not replace

    def _forward(self, ids, attn, pos, cache) -> torch.Tensor:
        kw = dict(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
        if self._logits_to_keep:
            kw["logits_to_keep"] = 1
        out = self.ctx.lm(**kw)
        self.ctx.stats.forwards += 1
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1]  # (b, V)

    def decode(self, ids, mask, params: SamplingParams, stop, seed, row_offset: int, rows: int):
        """See ``generator.Decoder``; ``rows`` is unused (the loop's shapes follow the chunk)."""
        B, P = ids.shape
        R = params.max_new_tokens
        dev, pad = ids.device, self.ctx.pad_token_id
        sync_every = self.ctx.sync_every_on(dev)
        tokens = torch.full((B, R), pad, dtype=torch.long, device=dev)  # (B, R) int64
        logps = torch.zeros((B, R), dtype=torch.float32, device=dev)  # (B, R) float32
        valid = torch.zeros((B, R), dtype=torch.bool, device=dev)  # (B, R) bool
        attn = torch.ones((B, P + R), dtype=torch.long, device=dev)
        attn[:, :P] = mask
        m = mask.long()
        live = _Live(finished=torch.zeros(B, dtype=torch.bool, device=dev), attn=attn,
                     next_pos=m.sum(-1, keepdim=True),  # position of the first generated token
                     noise_rows=torch.arange(B, device=dev) + row_offset)  # a row's draws follow its index in the call
        cache = kv.make_cache(self.ctx.config, self.ctx.kv_pool)
        logits = self._prefill(ids, attn[:, :P], m.cumsum(-1) - m, cache)  # pads get position 0; their keys are masked
        for t in range(R):
            tok, lp = sample_next(logits, params, step=t, stop_ids=stop, seed=seed, rows=live.noise_rows)
            if stop is not None:
                tok = tok.masked_fill(live.finished, pad)
                lp = lp.masked_fill(live.finished, 0.0)
            where = slice(None) if live.rows is None else live.rows
            tokens[where, t] = tok
            logps[where, t] = lp
            valid[where, t] = ~live.finished
            if t == R - 1:
                break
            if stop is not None:
                live.finished = live.finished | torch.isin(tok, stop)
                if (t + 1) % sync_every == 0:
                    tok = self._sync(live, tok, cache, remaining=R - 1 - t)
                    if tok is None:
                        break
            logits = self._forward(tok[:, None], live.attn[:, : P + t + 1], live.next_pos, cache)
            live.next_pos = live.next_pos + 1
        cache.reset()  # drop the views; the pool keeps the buffers for the next call
        return tokens, valid, logps

    def _prefill(self, ids, attn, pos, cache) -> torch.Tensor:
        """The prompts' forward, (B, V) last-token logits. Runs of identical rows (a group's
        samples of one prompt) share it: one row per run goes through the model and its KV and
        logits are broadcast to the run (``engine/prefix_share.py``)."""
        share = prefix_share.plan(ids, attn) if self.ctx.share_prefill else None
        if share is None:
            self.ctx.stats.prefill_rows += ids.shape[0]
            return self._forward(ids, attn, pos, cache)
        f = share.first
        logits = self._forward(ids[f], attn[f], pos[f], cache)  # (U, V)
        kv.select_rows(cache, share.expand)  # (U, ...) -> (B, ...): each row gets its run's keys / values
        self.ctx.stats.prefill_rows += f.numel()
        self.ctx.stats.prefill_rows_shared += share.saved_rows
        return logits[share.expand]

    def _sync(self, live: _Live, tok: torch.Tensor, cache, remaining: int) -> Optional[torch.Tensor]:
        """The all-finished check; compacts finished rows away when it pays. Returns the tokens to
        feed next (compacted with the batch), or None when every row has finished."""
        self.ctx.stats.syncs += 1
        n_done = int(live.finished.sum())  # CPU-GPU sync point: the all-finished check
        n = live.finished.numel()
        if n_done == n:
            return None
        # Compact when the rows saved over the remaining steps outweigh copying the live rows'
        # cache once (about one step's KV traffic).
        if self.ctx.compact_finished and n_done > 0 and n_done * remaining >= n:
            keep = (~live.finished).nonzero().flatten()
            live.select(keep)
            kv.select_rows(cache, keep)
            self.ctx.stats.compactions += 1
            return tok[keep]
        return tok
