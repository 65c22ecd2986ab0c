"""The compiled decode path (``decode="compiled"``): the static path's step traced by ``torch.compile``.

``static.StaticDecoder._step`` reads and updates one ``_State`` of static-address tensors in place,
so ``torch.compile`` traces it once per batch size and, with ``mode="reduce-overhead"`` on a GPU,
replays it as one CUDA graph per step: no kernel-launch overhead and no host sync except the
all-finished check every ``sync_every`` steps. ``torch.compiler.cudagraph_mark_step_begin()`` before
each step tells the CUDA-graph runtime that a new step begins (the last replay's outputs may be
overwritten: the step returns nothing and writes only into the state). The prefill stays eager.

What retraces: a new batch size (``HybridEngine`` pads every chunk to ``min(max_batch_size, rows
in the call)``), another temperature / top-k / top-p / do_sample / min_new_tokens, or another
number of stop ids. The seed, the prompts, their width and the response length do not. With KV
windows (``kv_bucket``) the second width traces once more with a symbolic width, and every later
width reuses that graph (a later batch size makes the batch symbolic too: one more trace); CUDA
graphs are recorded per width.

If the first call fails (a model or torch version the compiler cannot handle): under
``decode="auto"`` the engine gives this decoder the eager decoder as ``fallback``; the error is
logged as a warning and kept in ``stats.compile_error``, and the chunk (and, through
``generator.auto_path``, every later call) is decoded by the eager loop. Under
``decode="compiled"`` there is no fallback and the error is raised.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from rlhf_fast.engine.generator import DECODERS, AutoPreference, Decoder, DecoderContext
from rlhf_fast.engine.sampling import SamplingParams
from rlhf_fast.engine.static import StaticDecoder, _State, _View

log = logging.getLogger(__name__)


@DECODERS.register("compiled")
class CompiledDecoder(StaticDecoder):
    """``StaticDecoder`` with its step compiled (module docstring).

    compile_mode: ``torch.compile``'s ``mode`` (``ctx.compile_mode``; None: "reduce-overhead" on
    CUDA, inductor's default elsewhere). fullgraph / compile_backend: passed to ``torch.compile``
    (tests set ``fullgraph=True`` and the "eager" backend to prove the step has no graph break
    without paying for code generation). fallback: the decoder a failed first compile hands the
    chunk to (None: raise).
    """

    auto = AutoPreference(devices=("cuda",), rank=10, compiles=True, takes_fallback=True)  # on CPU no launches to save

    def __init__(self, ctx: DecoderContext, *, fallback: Optional[Decoder] = None):
        super().__init__(ctx)
        self.compile_mode = ctx.compile_mode
        self.fullgraph = False
        self.compile_backend = "inductor"
        self.fallback = fallback
        self._compiled = None
        self._compiled_ok = False  # a compiled step has run once without error

    @classmethod
    def unsupported(cls, ctx: DecoderContext) -> Optional[str]:
        reason = super().unsupported(ctx)
        if reason is None and ctx.zero3:
            reason = ("cannot trace ZeRO-3 partitioned parameters (they are gathered anew each call); "
                      "use decode='static' or 'eager'")
        return reason

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

    def _run_step(self, st: _State, view: _View, p: SamplingParams) -> None:
        torch.compiler.cudagraph_mark_step_begin()
        self._compiled_step()(st, view, p)

    def decode(self, ids, mask, params: SamplingParams, stop, seed, row_offset: int, rows: int):
        """See ``generator.Decoder``; the chunk is padded to ``rows`` rows, so that every chunk of a
        call (and every call with as many prompts) has one shape and one trace."""
        if self._compiled_ok:
            return self._decode(ids, mask, params, stop, seed, row_offset, pad_to=rows)
        try:
            out = self._decode(ids, mask, params, stop, seed, row_offset, pad_to=rows)
        except Exception as e:  # a model or torch version the compiler cannot handle
            if self.fallback is None:
                raise
            stats = self.ctx.stats
            stats.compile_error = f"{type(e).__name__}: {e}"
            log.warning("compiling the decode step failed; using the eager decode loop from now on (%s)",
                        stats.compile_error)
            stats.decode = "eager"
            return self.fallback.decode(ids, mask, params, stop, seed, row_offset, rows)
        self._compiled_ok = True
        return out
