"""The static decode path (``decode="static"``): fixed shapes, so the step can be compiled.

``StaticDecoder`` decodes a chunk of B rows with a Hugging Face ``StaticCache`` of width
``max_seq_len`` and keeps all of the loop's state in one ``_State`` of tensors it owns (the last
token, position ids, key mask, cache position, step, finished flags, and the (B, max_seq_len)
token / log-prob / valid buffers the step writes into). One decode step is then a function of that
state alone:

    key mask += this position -> model forward (one token, 4-D additive mask over the whole
    static cache) -> ``sample_next`` (counter-based uniforms, no RNG state) -> write token, log-prob
    and valid flag at ``step`` -> update finished / position / step, all in place.

No Python value changes from one step to the next, so ``compiled.CompiledDecoder`` traces the same
step once per batch size and replays it (as a CUDA graph on a GPU). Every state tensor (and the KV
cache, which HF marks itself) is marked as a static address, so a graph mutates them in place
instead of being re-recorded. The prefill (variable prompt width) runs eagerly into the same cache.

Differences from the eager loop in ``eager.py``: the static cache attends over all
``max_seq_len`` positions (masked) every step instead of the filled prefix, and finished rows keep
their place in the batch (their tokens are replaced by padding) instead of being compacted away.
Both produce the same tokens and log-probs: the uniform draws depend on (seed, step, row) only.

KV windows (``kv_bucket``): a static cache makes every step attend over the whole width, so a
step reads the KV of positions not generated yet (masked). With ``kv_bucket=b`` a step attends
over the first ``w`` positions only, ``w`` = the filled length rounded up to a multiple of ``b``:
the step runs on a ``_View`` whose ``StaticCache`` layers are views ``[:, :, :w]`` of the same
buffers (same ``cumulative_length`` tensor).

The cache width is ``max_seq_len`` rounded up to a multiple of 16, so SDPA's memory-efficient GPU
kernel can read the (B, 1, 1, width) mask (it needs an aligned last dimension).

Only models whose cache layers are all plain full-attention ``StaticLayer`` s use this path (the
4-D mask replaces HF's per-layer masks, which a sliding-window layer would need);
``StaticDecoder.supports`` says whether a config qualifies.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from rlhf_fast.engine.generator import DECODERS, DecoderContext
from rlhf_fast.engine.sampling import SamplingParams, sample_next


@dataclass
class _View:
    """What a step attends through: the static cache and key mask, whole or as views of their
    first ``w`` positions (``kv_bucket``)."""

    cache: StaticCache
    kmask: torch.Tensor  # (B, w) bool: cache positions a query may attend to


@dataclass
class _State:
    """Per-batch-size buffers, allocated once and reused by every call (static addresses): the
    whole state of the decode loop, read and updated in place by ``StaticDecoder._step``."""

    cache: StaticCache
    tok: torch.Tensor  # (B,) int64: the token fed to the next forward
    pos: torch.Tensor  # (B, 1) int64: its position id
    kmask: torch.Tensor  # (B, S) bool: cache positions a query may attend to
    cache_pos: torch.Tensor  # (1,) int64: where the next forward writes its key / value
    step: torch.Tensor  # (1,) int64: tokens generated so far
    finished: torch.Tensor  # (B,) bool
    seed: torch.Tensor  # () int64
    rows: torch.Tensor  # (B,) int64: row ids for the sampling draws
    stop: torch.Tensor  # (n_stop,) int64, or (0,) when no stop token
    tokens: torch.Tensor  # (B, S) int64
    logps: torch.Tensor  # (B, S) float32
    valid: torch.Tensor  # (B, S) bool
    whole: _View = field(init=False)  # the whole cache and key mask
    windows: dict[int, _View] = field(default_factory=dict)  # width -> views of the first width positions

    def __post_init__(self):
        self.whole = _View(self.cache, self.kmask)

    @classmethod
    def allocate(cls, config, B: int, S: int, n_stop: int, device) -> "_State":
        z = dict(device=device)
        st = cls(
            cache=StaticCache(config=config, max_cache_len=S),
            tok=torch.zeros(B, dtype=torch.long, **z), pos=torch.zeros(B, 1, dtype=torch.long, **z),
            kmask=torch.zeros(B, S, dtype=torch.bool, **z), cache_pos=torch.zeros(1, dtype=torch.long, **z),
            step=torch.zeros(1, dtype=torch.long, **z), finished=torch.zeros(B, dtype=torch.bool, **z),
            seed=torch.zeros((), dtype=torch.long, **z), rows=torch.zeros(B, dtype=torch.long, **z),
            stop=torch.zeros(n_stop, dtype=torch.long, **z), tokens=torch.zeros(B, S, dtype=torch.long, **z),
            logps=torch.zeros(B, S, dtype=torch.float32, **z), valid=torch.zeros(B, S, dtype=torch.bool, **z),
        )
        for t in st.tensors():
            torch._dynamo.mark_static_address(t)
        return st

    def tensors(self) -> list[torch.Tensor]:
        return [self.tok, self.pos, self.kmask, self.cache_pos, self.step, self.finished, self.seed, self.rows,
                self.stop, self.tokens, self.logps, self.valid]

    def reset(self, mask: torch.Tensor, seed: torch.Tensor, stop: Optional[torch.Tensor], row_offset: int,
              B0: int, pad_token_id: int) -> None:
        """Starts a call on left-padded prompts ``mask`` (B, P), in place (the addresses stay);
        rows from ``B0`` on are padding, finished from the start."""
        B, P = mask.shape
        m = mask.long()
        self.kmask.zero_()
        self.kmask[:, :P] = mask
        self.pos.copy_(m.sum(-1, keepdim=True))  # position id of the first generated token
        self.cache_pos.fill_(P)
        self.step.zero_()
        self.finished.zero_()
        if B > B0 and self.stop.numel():
            self.finished[B0:] = True  # padding rows never hold up the all-finished check
        self.seed.copy_(seed)
        self.rows.copy_(torch.arange(B, device=mask.device) + row_offset)
        if self.stop.numel():
            self.stop.copy_(stop)
        self.tokens.fill_(pad_token_id)
        self.logps.zero_()
        self.valid.zero_()


@DECODERS.register("static")
class StaticDecoder:
    """Static-cache decoding, the step run eagerly (``decode="static"``; ``compiled.CompiledDecoder``
    compiles it). Built from the engine's ``generator.DecoderContext``: the model it calls, the
    cache width (``max_seq_len`` rounded up to 16), the pad id written for finished rows, the
    stats it counts into, and ``kv_bucket``: attend over the filled length rounded up to this
    multiple of 16 instead of the whole cache (None: the whole cache).
    """

    auto = None  # decode="auto" never picks the uncompiled static step (its compiled twin, on CUDA)

    def __init__(self, ctx: DecoderContext):
        self.ctx = ctx
        self.lm, self.config = ctx.lm, ctx.config
        self.max_seq_len = -(-ctx.max_seq_len // 16) * 16  # cache width
        self.pad_token_id = ctx.pad_token_id
        self.kv_bucket = ctx.kv_bucket
        self._states: dict[tuple, _State] = {}
        self._logits_to_keep = ctx.logits_to_keep

    @staticmethod
    def supports(config, max_seq_len: int) -> Optional[str]:
        """None when every cache layer of ``config`` is a full-attention ``StaticLayer``, else why not."""
        try:
            cache = StaticCache(config=config, max_cache_len=max_seq_len)
        except Exception as e:  # an architecture HF cannot give a static cache
            return f"Hugging Face has no static cache for it ({type(e).__name__}: {e})"
        kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer}
        return f"it has {', '.join(sorted(kinds))} cache layers" if kinds else None

    @classmethod
    def unsupported(cls, ctx: DecoderContext) -> Optional[str]:
        reason = cls.supports(ctx.config, ctx.max_seq_len)
        if reason:
            return f"needs a plain static KV cache, but {type(ctx.lm).__name__}: {reason}; use decode='eager'"
        return None

    # ---- state -----------------------------------------------------------------------------

    def _state(self, B: int, device, dtype, n_stop: int) -> _State:
        key = (B, str(device), dtype, n_stop)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _State.allocate(self.config, B, self.max_seq_len, n_stop, device)
        else:
            st.cache.reset()
        return st

    def _view(self, st: _State, filled: int) -> _View:
        """What a step attends through when ``filled`` positions are filled (its own included):
        the whole cache, or with ``kv_bucket`` views of the first ``filled`` rounded up positions."""
        if not self.kv_bucket:
            return st.whole
        width = -(-filled // self.kv_bucket) * self.kv_bucket
        if width >= self.max_seq_len:
            return st.whole
        view = st.windows.get(width)
        if view is None:
            cache = copy.copy(st.cache)
            cache.layers = []
            for layer in st.cache.layers:
                part = copy.copy(layer)  # shares cumulative_length and the buffers
                part.keys, part.values = layer.keys[:, :, :width], layer.values[:, :, :width]
                part.max_cache_len = width
                torch._dynamo.mark_static_address(part.keys)
                torch._dynamo.mark_static_address(part.values)
                cache.layers.append(part)
            kmask = st.kmask[:, :width]
            torch._dynamo.mark_static_address(kmask)
            view = st.windows[width] = _View(cache, kmask)
        return view

    def buffer_bytes(self) -> int:
        """Bytes held by the static caches and state buffers (0 before the first call)."""
        n = 0
        for st in self._states.values():
            n += sum(t.numel() * t.element_size() for t in st.tensors())
            for layer in st.cache.layers:
                if layer.is_initialized:
                    n += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        return n

    # ---- decode ----------------------------------------------------------------------------

    def _additive_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """0 where ``allowed``, the dtype's lowest value elsewhere (an additive mask works with both
        HF's eager and SDPA attention, and a fully masked query row stays finite)."""
        zero = torch.zeros((), dtype=self._dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(self._dtype).min)

    def _forward(self, ids, allowed, pos, cache) -> torch.Tensor:
        kw = dict(input_ids=ids, attention_mask=self._additive_mask(allowed), position_ids=pos,
                  past_key_values=cache, use_cache=True)
        if self._logits_to_keep:
            kw["logits_to_keep"] = 1
        out = self.lm(**kw)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1]  # (B, V)

    def _record(self, st: _State, logits: torch.Tensor, p: SamplingParams) -> None:
        """Samples from ``logits`` and writes the result at ``st.step``, in place (eager or traced)."""
        stop = st.stop if st.stop.numel() else None
        new, lp = sample_next(logits, p, step=st.step, stop_ids=stop, seed=st.seed, rows=st.rows)
        live = ~st.finished
        new = torch.where(live, new, self.pad_token_id)
        lp = torch.where(live, lp, 0.0)
        st.tokens.index_copy_(1, st.step, new[:, None])
        st.logps.index_copy_(1, st.step, lp[:, None])
        st.valid.index_copy_(1, st.step, live[:, None])
        if stop is not None:
            st.finished.copy_(st.finished | torch.isin(new, stop))
        st.tok.copy_(new)
        st.step.add_(1)

    def _step(self, st: _State, view: _View, p: SamplingParams) -> None:
        """One decode step on the state, all updates in place (the function ``CompiledDecoder`` compiles)."""
        view.kmask.index_fill_(1, st.cache_pos, True)
        logits = self._forward(st.tok[:, None], view.kmask[:, None, None, :], st.pos, view.cache)
        self._record(st, logits, p)
        st.pos.add_(1)
        st.cache_pos.add_(1)

    def _run_step(self, st: _State, view: _View, p: SamplingParams) -> None:
        self._step(st, view, p)

    def decode(self, ids, mask, params: SamplingParams, stop, seed, row_offset: int, rows: int):
        """See ``generator.Decoder``; the static path decodes the chunk as it is (``rows`` unused)."""
        return self._decode(ids, mask, params, stop, seed, row_offset, pad_to=None)

    def _decode(self, ids, mask, params: SamplingParams, stop: Optional[torch.Tensor], seed: torch.Tensor,
                row_offset: int, pad_to: Optional[int]):
        """(tokens, valid, log-probs), each (B0, max_new_tokens) for the B0 rows of ``ids``.

        pad_to: decode as if the batch had this many rows (copies of row 0, finished from the start
        and dropped from the result), so that every call of a compiled step has one shape."""
        B0, P = ids.shape
        R = params.max_new_tokens
        B = max(B0, pad_to or 0)
        if B > B0:
            ids = torch.cat([ids, ids[:1].expand(B - B0, P)])
            mask = torch.cat([mask, mask[:1].expand(B - B0, P)])
        dev = ids.device
        self._device = dev
        self._dtype = next(self.lm.parameters()).dtype
        n_stop = 0 if stop is None else stop.numel()
        st = self._state(B, dev, self._dtype, n_stop)
        st.reset(mask, seed, stop, row_offset, B0, self.pad_token_id)
        self._prefill(st, ids, mask, params)
        sync_every, stats = self.ctx.sync_every_on(dev), self.ctx.stats
        for t in range(1, R):
            if n_stop and t % sync_every == 0:
                stats.syncs += 1
                if bool(st.finished.all()):  # CPU-GPU sync point: the all-finished check
                    break
            self._run_step(st, self._view(st, P + t), params)  # this step's query is at cache position P + t - 1
            stats.forwards += 1
        return st.tokens[:B0, :R].clone(), st.valid[:B0, :R].clone(), st.logps[:B0, :R].clone()

    def _prefill(self, st: _State, ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams) -> None:
        """The prompts' forward into the static cache (eager: the width P varies) and the first token."""
        B, P = ids.shape
        m = mask.long()
        causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
        allowed = torch.zeros(B, 1, P, self.max_seq_len, dtype=torch.bool, device=ids.device)
        allowed[..., :P] = causal & mask.bool()[:, None, None, :]
        logits = self._forward(ids, allowed, m.cumsum(-1) - m, st.cache)
        self.ctx.stats.forwards += 1
        self._record(st, logits, params)
