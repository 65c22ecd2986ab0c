"""``HybridEngine``: KV-cached generation on the live training weights.

The engine holds a reference to the training module (plain, a ``Policy``, or a DeepSpeed engine
around either) and calls the same Hugging Face model code the trainer runs, so nothing is copied
and nothing goes stale: after an optimizer step the next ``generate`` samples from the new
weights, and the sampled tokens' log-probs equal the trainer's recomputation (the generator /
trainer mismatch of TRL #4159 and verl PR #2953 cannot arise).

Per call: the inputs checked (one host sync), inference mode (``inference.inference_mode``), ZeRO-3
parameters gathered once (``inference.zero3_gathered``), the prompts split into chunks of at most
``max_batch_size`` rows, each decoded by the chosen decoder on engine-owned buffers, and the chunks
joined (one host sync to trim R to the longest response).

Decode paths (``decode=``): each chunk of rows is decoded by a ``generator.Decoder`` from the
``generator.DECODERS`` registry: ``"eager"`` (``eager.EagerDecoder``: filled-prefix attention,
finished rows compacted away), ``"static"`` (``static.StaticDecoder``: a static cache and a decode
step whose state lives in tensors) and ``"compiled"`` (``compiled.CompiledDecoder``: that step
traced by ``torch.compile``, CUDA graphs through ``mode="reduce-overhead"`` on a GPU). ``"auto"``
(the default) takes ``"compiled"`` on CUDA for architectures with a plain static cache and no
ZeRO-3 partitioning, ``"eager"`` otherwise (``generator.build_decoders`` / ``auto_path``). All
paths sample the same tokens for the same seed (counter-based uniforms, one per row and step).
If compiling fails on the first call, the engine logs a warning with the error, records it in
``stats.compile_error`` and goes on with the eager loop.

``HybridEngine`` is the live-weight ``generator.Generator``: ``on_weights_updated`` has nothing
to sync.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from rlhf_fast import _checks
from rlhf_fast.engine import cache as kv
from rlhf_fast.engine import episodes
from rlhf_fast.engine import eager, static, compiled  # noqa: F401, I001  (register the built-in decoders, in this order)
from rlhf_fast.engine.generator import (
    DecoderContext,
    EngineStats,
    GenerationOutput,
    auto_path,
    build_decoders,
    decode_modes,
)
from rlhf_fast.engine.inference import inference_mode, unwrap, zero3_gathered, zero3_params
from rlhf_fast.engine.sampling import SamplingParams

__all__ = ["EngineStats", "GenerationOutput", "HybridEngine", "decode_modes"]


# Architectures whose positions are a learned table: a position past it is an index error (GPT-2's
# wpe), not a quality question. Rotary / ALiBi models only warn.
_LEARNED_POSITIONS = {"gpt2", "gpt_bigcode", "gpt_neo", "opt"}


def _check_position_limit(config, max_seq_len: int) -> None:
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or max_seq_len <= limit:
        return
    if getattr(config, "model_type", None) in _LEARNED_POSITIONS:
        raise ValueError(
            f"max_seq_len {max_seq_len} exceeds the model's {limit} learned positions ({config.model_type}); "
            f"shorten the prompts / max_new_tokens or use a model with more positions"
        )
    warnings.warn(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings {limit}: "
                  "positions past it were never trained", stacklevel=3)


class HybridEngine:
    """Generation on the training module's own weights with an engine-owned KV cache: the
    live-weight ``generator.Generator``.

    model: a HF causal LM, a ``rlhf_fast.models.Policy``, or a DeepSpeed engine wrapping either.
    pad_token_id: written after each row's stop token.
    max_batch_size: rows decoded at once; a larger batch is split into chunks of this size and the
        results concatenated (padded to the longest chunk's R) — never truncated.
    max_seq_len: prompt width P (padding included) + max_new_tokens must fit; sizes the KV buffers.
    sync_every: steps between all-finished checks (the decode loop's only host sync). Default: 1
        on CPU, where a sync costs nothing, 8 on a GPU.
    compact_finished: drop finished rows from the batch (and the KV cache) at those checks
        (eager path only).
    decode: "auto" | "eager" | "static" | "compiled", or another name registered in
        ``generator.DECODERS`` (see the module docstring); a path that cannot run with this model
        raises ValueError here.
    compile_mode: ``torch.compile`` mode for ``decode="compiled"`` (default: "reduce-overhead" on
        CUDA, inductor's default elsewhere). A compiled step decodes chunks of
        ``min(max_batch_size, rows in the call)`` rows (the last chunk is padded), so a training
        loop that always generates for the same number of prompts traces it once.
    kv_bucket: static / compiled paths: attend over the filled length rounded up to this multiple
        of 16 rather than the whole cache (``static.StaticDecoder``); None: the whole cache.
    """

    logprobs_match_trainer = True  # the training module's own forward, the sampler's own filter

    def __init__(
        self,
        model,
        *,
        pad_token_id: int,
        max_batch_size: int,
        max_seq_len: int,
        sync_every: Optional[int] = None,
        compact_finished: bool = True,
        decode: str = "auto",
        compile_mode: Optional[str] = None,
        kv_bucket: Optional[int] = None,
        share_prefill: bool = True,
    ):
        self.module, self.lm, self.ds_engine = unwrap(model)
        _checks.check_int("max_batch_size", max_batch_size, 1)
        _checks.check_int("max_seq_len", max_seq_len, 1)
        if sync_every is not None:
            _checks.check_int("sync_every", sync_every, 1, what="an int >= 1 or None")
        self.config = self.lm.config.get_text_config(decoder=True) if hasattr(self.lm.config, "get_text_config") else self.lm.config
        self.vocab_size = int(self.config.vocab_size)
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or not 0 <= pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be an int in [0, vocab_size={self.vocab_size}), got {pad_token_id!r}")
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        _check_position_limit(self.config, max_seq_len)
        self.kv_pool = kv.KVBufferPool(max_batch_size, max_seq_len)
        self._ctx = DecoderContext(
            lm=self.lm, config=self.config, pad_token_id=pad_token_id, max_seq_len=max_seq_len, kv_pool=self.kv_pool,
            stats=EngineStats(), sync_every=sync_every, compact_finished=compact_finished, compile_mode=compile_mode,
            kv_bucket=kv_bucket, zero3=bool(zero3_params(self.module)),  # fixed for the engine's life
            share_prefill=share_prefill,
        )
        self.decode = decode
        self._decoders = build_decoders(decode, self._ctx)  # name -> decoder, the paths this engine may take
        # the static-cache decoder, if any (tests tune its compile settings and read its buffers)
        self._static = next((d for d in self._decoders.values() if isinstance(d, static.StaticDecoder)), None)

    @property
    def stats(self) -> EngineStats:
        """The counters every decoder of this engine adds to."""
        return self._ctx.stats

    @stats.setter
    def stats(self, value: EngineStats) -> None:
        self._ctx.stats = value

    @property
    def sync_every(self) -> Optional[int]:
        """As given to the constructor (read-only: the decoders were built with it)."""
        return self._ctx.sync_every

    @property
    def compact_finished(self) -> bool:
        """As given to the constructor (read-only: the decoders were built with it)."""
        return self._ctx.compact_finished

    def decode_path(self, device: torch.device) -> str:
        """The decode path a call on ``device`` takes: "eager", "static", "compiled" (or another
        registered decoder's name)."""
        if self.decode != "auto":
            return self.decode
        return auto_path(device, self._decoders, self.stats)

    # ---- public --------------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams) -> GenerationOutput:
        """Responses for left-padded prompts ``input_ids`` / ``attention_mask`` (B, P)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        input_ids, mask = self._check_inputs(input_ids, attention_mask, params)
        device = input_ids.device
        stop = params.stop_ids()
        stop_t = torch.tensor(stop, dtype=torch.long, device=device) if stop else None  # (n_stop,) int64
        # the sampling seed: drawn from torch's global CPU generator when not given (no device sync)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
        seed_t = torch.tensor(seed, dtype=torch.long, device=device)
        self.stats.calls += 1
        outs = []
        rows = min(self.max_batch_size, input_ids.shape[0])  # the chunk size; compiled steps pad to it
        with inference_mode(self.module), zero3_gathered(self.module, self.ds_engine, self._count_gather):
            for start in range(0, input_ids.shape[0], rows):
                chunk = slice(start, start + rows)
                outs.append(self._chunk(input_ids[chunk], mask[chunk], params, stop_t, seed_t, start, rows))
        return _concat(outs, input_ids.long(), self.pad_token_id)

    def run_episodes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams, *,
                     envs, prompts, encode, decode, max_turns: int):
        """Multi-turn episodes against environments, the KV cache continuing across turns
        (``episodes.run_episodes``; docs/architecture.md, "Multi-turn episodes")."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        return episodes.run_episodes(self, input_ids, attention_mask, params, envs=envs, prompts=prompts,
                                     encode=encode, decode=decode, max_turns=max_turns)

    def on_weights_updated(self) -> None:
        """Nothing to do: every decode step reads the training module's current weights (ZeRO-3
        ones are gathered anew by every call; a compiled step takes the parameters as inputs)."""

    # ---- checks --------------------------------------------------------------------------

    def _count_gather(self) -> None:
        self.stats.gathers += 1

    def _check_inputs(self, input_ids, attention_mask, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, bool mask) after the checks; ids outside the vocabulary at padded positions
        (e.g. -100 fillers) become ``pad_token_id`` (they are never attended to, but the embedding
        would still read them)."""
        _checks.check_tensor("input_ids", input_ids, floating=False)
        _checks.check_tensor("attention_mask", attention_mask)
        if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty (batch, prompt_len) tensor, got shape {tuple(input_ids.shape)}")
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        _checks.check_same_device(input_ids=input_ids, attention_mask=attention_mask)
        P = input_ids.shape[1]
        if P + params.max_new_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt width {P} (padding included) + max_new_tokens {params.max_new_tokens} = "
                f"{P + params.max_new_tokens} exceeds max_seq_len {self.max_seq_len}; truncate the prompts or "
                "build the engine with a larger max_seq_len"
            )
        for tok in (*params.stop_ids(), self.pad_token_id):
            if tok >= self.vocab_size:
                raise ValueError(f"token id {tok} (eos / stop) is outside the vocabulary of size {self.vocab_size}")
        mask = attention_mask.bool()
        lengths = mask.sum(1)
        outside = (input_ids < 0) | (input_ids >= self.vocab_size)
        not01 = torch.zeros((), dtype=torch.bool, device=mask.device) if attention_mask.dtype == torch.bool \
            else ((attention_mask != 0) & (attention_mask != 1)).any()
        # one host sync per call: the price of a clear error instead of garbage
        bad = torch.stack([(lengths == 0).any(), (~mask[:, -1]).any(), (outside & mask).any(), not01,
                           (outside & ~mask).any()]).tolist()
        if bad[3]:
            raise ValueError("attention_mask must hold only 0 and 1 (or be bool)")
        if bad[2]:
            r, c = (outside & mask).nonzero()[0].tolist()
            raise ValueError(f"input_ids[{r}, {c}] = {int(input_ids[r, c])} is outside the vocabulary "
                             f"[0, {self.vocab_size}) at an attended position")
        if bad[0]:
            rows = (lengths == 0).nonzero().flatten().tolist()
            raise ValueError(f"empty prompt (attention_mask all zero) in rows {rows[:8]}")
        if bad[1]:
            raise ValueError(
                "prompts must be left padded (attention_mask[:, -1] all ones); use rlhf_fast.data's left-padding collators"
            )
        param = next(self.lm.parameters(), None)
        if param is not None and param.device != input_ids.device:
            raise ValueError(f"input_ids are on {input_ids.device} but the model is on {param.device}")
        if bad[4]:
            input_ids = input_ids.masked_fill(outside & ~mask, self.pad_token_id)
        return input_ids, mask

    # ---- decode --------------------------------------------------------------------------

    def _chunk(self, ids, mask, params: SamplingParams, stop, seed, row_offset: int, rows: int):
        """(tokens, valid, logps) of one chunk, each (b, max_new_tokens), from the path ``decode_path`` picks."""
        path = self.decode_path(ids.device)
        decoder = self._decoders.get(path)
        if decoder is None:
            raise ValueError(f"decode path {path!r} is not one this engine built (decode={self.decode!r}: "
                             f"{sorted(self._decoders)})")
        self.stats.decode = path
        return decoder.decode(ids, mask, params, stop, seed, row_offset, rows)


def _concat(outs, input_ids: torch.Tensor, pad: int) -> GenerationOutput:
    """Joins chunk results (each max_new_tokens wide), trimming R to the longest response."""
    R = max(int(v.sum(1).max()) for _, v, _ in outs)  # one host sync; responses are prefixes
    tokens = torch.cat([t[:, :R] for t, _, _ in outs])
    valid = torch.cat([v[:, :R] for _, v, _ in outs])
    logps = torch.cat([lp[:, :R] for _, _, lp in outs])
    return GenerationOutput(sequences=torch.cat([input_ids, tokens], 1), response_mask=valid, logprobs=logps)
