"""The static decode path: fixed shapes, so the decode step can be compiled and CUDA-graphed.

``StaticDecoder`` decodes a chunk of B rows with a Hugging Face ``StaticCache`` of width
``max_seq_len`` and keeps all of the loop's state in tensors it owns (the last token, position
ids, key mask, cache position, step, finished flags, and the (B, max_seq_len) token / log-prob /
valid buffers the step writes into). One decode step is then a function of those tensors alone:

    key mask += this position -> model forward (one token, 4-D additive mask over the whole
    static cache) -> ``sample_next`` (counter-based uniforms, no RNG state) -> write token, log-prob
    and valid flag at ``step`` -> update finished / position / step, all in place.

No Python value changes from one step to the next, so ``torch.compile`` traces it once per batch
size and, with ``mode="reduce-overhead"`` on a GPU, replays it as one CUDA graph per step: no
kernel-launch overhead and no host sync except the all-finished check every ``sync_every`` steps.
Every state tensor (and the KV cache, which HF marks itself) is marked as a static address, so
the graph mutates them in place instead of being re-recorded. The prefill (variable prompt width)
runs eagerly into the same cache.

Differences from the eager loop in ``hybrid.py``: the static cache attends over all
``max_seq_len`` positions (masked) every step instead of the filled prefix, and finished rows keep
their place in the batch (their tokens are replaced by padding) instead of being compacted away.
Both produce the same tokens and log-probs: the uniform draws depend on (seed, step, row) only.

KV windows (``kv_bucket``): a static cache makes every step attend over the whole width, so a
step reads the KV of positions not generated yet (masked). With ``kv_bucket=b`` a step attends
over the first ``w`` positions only, ``w`` = the filled length rounded up to a multiple of ``b``:
the step runs on a ``StaticCache`` whose layers are views ``[:, :, :w]`` of the same buffers (same
``cumulative_length`` tensor). The second width makes ``torch.compile`` trace once more with a
symbolic width, and every later width reuses that graph (a later batch size makes the batch
symbolic too: one more trace); CUDA graphs are recorded per width.

What retraces: a new batch size (``HybridEngine`` pads every call to ``max_batch_size``), another
temperature / top-k / top-p / do_sample / min_new_tokens, or another number of stop ids. The seed,
the prompts, their width and the response length do not.

The cache width is ``max_seq_len`` rounded up to a multiple of 16, so SDPA's memory-efficient GPU
kernel can read the (B, 1, 1, width) mask (it needs an aligned last dimension).

Only models whose cache layers are all plain full-attention ``StaticLayer`` s use this path (the
4-D mask replaces HF's per-layer masks, which a sliding-window layer would need);
``StaticDecoder.supports`` says whether a config qualifies.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from rlhf_fast.engine.sampling import SamplingParams, sample_next

log = logging.getLogger(__name__)


@dataclass
class _State:
    """Per-batch-size buffers, allocated once and reused by every call (static addresses)."""

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
    windows: dict = field(default_factory=dict)  # width -> (StaticCache, key mask): views of the first width positions

    def tensors(self) -> list[torch.Tensor]:
        return [self.tok, self.pos, self.kmask, self.cache_pos, self.step, self.finished, self.seed, self.rows,
                self.stop, self.tokens, self.logps, self.valid]


class StaticDecoder:
    """Static-cache decoding for ``HybridEngine`` (``decode="static"`` or ``"compiled"``).

    lm: the HF causal LM (called, never copied); config: its text config; max_seq_len: the
    static cache width (rounded up to 16); compile_mode: ``torch.compile``'s ``mode`` when
    ``generate_chunk(compiled=True)`` (default ``"reduce-overhead"`` on CUDA, inductor's default
    elsewhere); pad_token_id: written for finished rows; kv_bucket: attend over the filled length
    rounded up to this multiple of 16 instead of the whole cache (None: the whole cache);
    fullgraph / compile_backend: passed to ``torch.compile`` (tests trace with ``fullgraph=True`` and the "eager" backend to prove the
    step has no graph break without paying for code generation).
    """

    def __init__(self, lm, config, *, max_seq_len: int, pad_token_id: int, compile_mode: Optional[str] = None, fullgraph: bool = False, compile_backend="inductor",
                 kv_bucket: Optional[int] = None):
        self.lm, self.config = lm, config
        self.max_seq_len = -(-max_seq_len // 16) * 16  # cache width
        self.pad_token_id = pad_token_id
        self.compile_mode, self.fullgraph = compile_mode, fullgraph
        self.compile_backend = compile_backend
        if kv_bucket is not None and (isinstance(kv_bucket, bool) or not isinstance(kv_bucket, int) or kv_bucket < 16
                                      or kv_bucket % 16):
            raise ValueError(f"kv_bucket must be None or a positive multiple of 16, got {kv_bucket!r}")
        self.kv_bucket = kv_bucket
        self._states: dict[tuple, _State] = {}
        self._compiled = None
        self._logits_to_keep = "logits_to_keep" in inspect.signature(lm.forward).parameters

    @staticmethod
    def supports(config, max_seq_len: int) -> Optional[str]:
        """None when every cache layer of ``config`` is a full-attention ``StaticLayer``, else why not."""
        try:
            cache = StaticCache(config=config, max_cache_len=max_seq_len)
        except Exception as e:  # an architecture HF cannot give a static cache
            return f"Hugging Face has no static cache for it ({type(e).__name__}: {e})"
        kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not StaticLayer}
        return f"it has {', '.join(sorted(kinds))} cache layers" if kinds else None

    # ---- state -----------------------------------------------------------------------------

    def _state(self, B: int, device, dtype, n_stop: int) -> _State:
        key = (B, str(device), dtype, n_stop)
        st = self._states.get(key)
        S = self.max_seq_len
        if st is None:
            z = dict(device=device)
            st = _State(
                cache=StaticCache(config=self.config, max_cache_len=S),
                tok=torch.zeros(B, dtype=torch.long, **z), pos=torch.zeros(B, 1, dtype=torch.long, **z),
                kmask=torch.zeros(B, S, dtype=torch.bool, **z), cache_pos=torch.zeros(1, dtype=torch.long, **z),
                step=torch.zeros(1, dtype=torch.long, **z), finished=torch.zeros(B, dtype=torch.bool, **z),
                seed=torch.zeros((), dtype=torch.long, **z), rows=torch.zeros(B, dtype=torch.long, **z),
                stop=torch.zeros(n_stop, dtype=torch.long, **z), tokens=torch.zeros(B, S, dtype=torch.long, **z),
                logps=torch.zeros(B, S, dtype=torch.float32, **z), valid=torch.zeros(B, S, dtype=torch.bool, **z),
            )
            for t in st.tensors():
                torch._dynamo.mark_static_address(t)
            self._states[key] = st
        else:
            st.cache.reset()
        return st

    def _window(self, st: _State, width: int) -> tuple[StaticCache, torch.Tensor]:
        """The cache and key mask a step attends through: views of the first ``width`` positions."""
        if width >= self.max_seq_len:
            return st.cache, st.kmask
        entry = st.windows.get(width)
        if entry is None:
            cache = copy.copy(st.cache)
            cache.layers = []
            for layer in st.cache.layers:
                view = copy.copy(layer)  # shares cumulative_length and the buffers
                view.keys, view.values = layer.keys[:, :, :width], layer.values[:, :, :width]
                view.max_cache_len = width
                torch._dynamo.mark_static_address(view.keys)
                torch._dynamo.mark_static_address(view.values)
                cache.layers.append(view)
            kmask = st.kmask[:, :width]
            torch._dynamo.mark_static_address(kmask)
            entry = st.windows[width] = (cache, kmask)
        return entry

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
        return logits[:, -1]

    def _record(self, logits, p: SamplingParams, tok, step, finished, seed, rows, stop, tokens, logps, valid):
        """Samples from ``logits`` and writes the result at ``step``, in place (eager or traced)."""
        new, lp = sample_next(logits, p, step=step, stop_ids=stop if stop.numel() else None, seed=seed, rows=rows)
        live = ~finished
        new = torch.where(live, new, self.pad_token_id)
        lp = torch.where(live, lp, 0.0)
        tokens.index_copy_(1, step, new[:, None])
        logps.index_copy_(1, step, lp[:, None])
        valid.index_copy_(1, step, live[:, None])
        if stop.numel():
            finished.copy_(finished | torch.isin(new, stop))
        tok.copy_(new)
        step.add_(1)

    def _step(self, cache, p: SamplingParams, tok, pos, kmask, cache_pos, step, finished, seed, rows, stop,
              tokens, logps, valid) -> None:
        """One decode step on the state tensors, all updates in place (the function that is compiled)."""
        kmask.index_fill_(1, cache_pos, True)
        logits = self._forward(tok[:, None], kmask[:, None, None, :], pos, cache)
        self._record(logits, p, tok, step, finished, seed, rows, stop, tokens, logps, valid)
        pos.add_(1)
        cache_pos.add_(1)

    def _compiled_step(self):
        if self._compiled is None:
            mode = self.compile_mode
            if mode is None and self._device.type == "cuda" and self.compile_backend == "inductor":
                mode = "reduce-overhead"
            log.info("compiling the decode step (torch.compile backend=%s mode=%s fullgraph=%s)",
                     self.compile_backend, mode, self.fullgraph)
            # dynamic=None: a second KV-window width is traced once more with a symbolic width
            self._compiled = torch.compile(self._step, backend=self.compile_backend, mode=mode,
                                           fullgraph=self.fullgraph, dynamic=None if self.kv_bucket else False)
        return self._compiled

    def generate_chunk(self, ids, mask, params: SamplingParams, stop: Optional[torch.Tensor], seed: torch.Tensor,
                       row_offset: int, sync_every: int, stats, *, compiled: bool, pad_to: Optional[int] = None):
        """Like ``HybridEngine._generate_chunk``: (tokens, valid, log-probs), each (B, max_new_tokens).

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
        S = self.max_seq_len
        # --- reset the state for this call (in place: the addresses stay) ---
        m = mask.long()
        st.kmask.zero_()
        st.kmask[:, :P] = mask
        st.pos.copy_(m.sum(-1, keepdim=True))  # position id of the first generated token
        st.cache_pos.fill_(P)
        st.step.zero_()
        st.finished.zero_()
        if B > B0 and n_stop:
            st.finished[B0:] = True  # padding rows never hold up the all-finished check
        st.seed.copy_(seed)
        st.rows.copy_(torch.arange(B, device=dev) + row_offset)
        if n_stop:
            st.stop.copy_(stop)
        st.tokens.fill_(self.pad_token_id)
        st.logps.zero_()
        st.valid.zero_()
        # --- prefill (eager; variable width P) ---
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        allowed = torch.zeros(B, 1, P, S, dtype=torch.bool, device=dev)
        allowed[..., :P] = causal & mask.bool()[:, None, None, :]
        logits = self._forward(ids, allowed, m.cumsum(-1) - m, st.cache)
        stats.forwards += 1
        self._record(logits, params, st.tok, st.step, st.finished, st.seed, st.rows, st.stop, st.tokens, st.logps,
                     st.valid)
        # --- decode ---
        step_fn = self._compiled_step() if compiled else self._step
        for t in range(1, R):
            if n_stop and t % sync_every == 0:
                stats.syncs += 1
                if bool(st.finished.all()):  # CPU-GPU sync point: the all-finished check
                    break
            cache, kmask = st.cache, st.kmask
            if self.kv_bucket:  # this step's query is at cache position P + t - 1
                cache, kmask = self._window(st, -(-(P + t) // self.kv_bucket) * self.kv_bucket)
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            step_fn(cache, params, st.tok, st.pos, kmask, st.cache_pos, st.step, st.finished, st.seed, st.rows,
                    st.stop, st.tokens, st.logps, st.valid)
            stats.forwards += 1
        return st.tokens[:B0, :R].clone(), st.valid[:B0, :R].clone(), st.logps[:B0, :R].clone()
