"""The engine's interfaces: what a trainer calls (``Generator``) and what a decode path implements
(``Decoder``), the result types, and the decoder registry with the "auto" rule that picks from it.

Two levels, because the expensive part differs by backend:

- ``Generator``: a whole ``generate`` call, prompts in, ``GenerationOutput`` out, plus the hook a
  backend needs around weight updates. ``hybrid.HybridEngine`` is the live-weight generator (it
  decodes with the training module itself); a backend holding its own copy of the weights (a
  vLLM-style server) would be another ``Generator``.
- ``Decoder``: one chunk of at most ``max_batch_size`` rows, after ``HybridEngine`` has checked the
  inputs, entered inference mode and gathered ZeRO-3 parameters. ``eager.EagerDecoder``,
  ``static.StaticDecoder`` and ``compiled.CompiledDecoder`` are registered in ``DECODERS`` under
  "eager", "static" and "compiled"; a new decode path is a new file that registers a class.

Every decoder draws the same tokens for the same seed: the uniforms are a function of (seed,
step, row) (``sampling.counter_uniform``), where the row is the prompt's index in the whole call
(``row_offset`` + its index in the chunk), never its place in a chunk or a compacted batch.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch
from transformers import PretrainedConfig

from rlhf_fast._registry import Registry
from rlhf_fast.engine.cache import KVBufferPool
from rlhf_fast.engine.sampling import SamplingParams


@dataclass
class GenerationOutput:
    """Result of ``Generator.generate`` (R = the longest response, at most max_new_tokens).

    sequences: (B, P + R) int64: the prompts as given (left padded), then the responses, with
        ``pad_token_id`` after each row's stop token.
    response_mask: (B, R) bool: generated tokens up to and including the EOS / stop token.
    logprobs: (B, R) float32: log-prob of each generated token under the temperature-scaled,
        top-k / top-p renormalised distribution it was drawn from; 0 where the mask is False.
    """

    sequences: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor

    @property
    def responses(self) -> torch.Tensor:
        """(B, R) the generated part of ``sequences``."""
        return self.sequences[:, self.sequences.shape[1] - self.response_mask.shape[1] :]


@dataclass
class EngineStats:
    """Counters for tests and logs: ``generate`` calls, ZeRO-3 gathers, decode forwards, rows
    compacted away, host syncs in the decode loops, the decode path used by the last call, and
    the error that made a compiled decode step fall back to the eager loop (None if none)."""

    calls: int = 0
    gathers: int = 0
    forwards: int = 0
    compactions: int = 0
    syncs: int = 0
    prefill_rows: int = 0
    """prompt rows run through a prefill forward (the eager path's shared prefill counts one per group)."""
    prefill_rows_shared: int = 0
    """rows whose prefill was a copy of an identical row's (group sampling, ``engine/prefix_share.py``)."""
    decode: str = ""
    compile_error: Optional[str] = None
    weight_syncs: int = 0
    """``on_weights_updated`` calls that copied weights (a backend with its own copy; 0 for the hybrid engine)."""
    weight_sync_bytes: int = 0
    """bytes those syncs copied, in all."""


@runtime_checkable
class Generator(Protocol):
    """What the trainer generates rollouts with (``factory.make_generator`` builds one).

    The trainer's obligations, in order, every iteration:

    1. ``generate(input_ids, attention_mask, params)`` on left-padded prompts (B, P);
    2. train: any number of optimizer steps on the policy;
    3. ``on_weights_updated()`` once the optimizer steps of the iteration are done, before the
       next ``generate`` (also after loading a checkpoint into the policy).

    ``stats`` holds the backend's counters (``EngineStats``), read by tests and logs.
    ``logprobs_match_trainer``: the returned log-probs are the trainer's own numbers (same weights,
    same model code, same sampler filter; the hybrid engine), so the trainer may take them as the
    old log-probs (``ppo.old_logprobs: rollout``); False: the trainer recomputes them and logs the gap.
    """

    stats: EngineStats
    logprobs_match_trainer: bool

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 params: SamplingParams) -> GenerationOutput:
        """Responses for left-padded prompts ``input_ids`` / ``attention_mask`` (B, P)."""
        ...

    def on_weights_updated(self) -> None:
        """The policy's weights changed: a backend with its own copy of the weights syncs it here
        (a live-weight backend has nothing to do: it reads the training weights at every step)."""
        ...


@dataclass
class DecoderContext:
    """What a decoder is built from: the model it calls and the engine settings it reads.

    lm: the Hugging Face causal LM (called, never copied); config: its text config.
    pad_token_id: written after each row's stop token. max_seq_len: prompt width + new tokens fit.
    kv_pool: the engine's KV buffers (``cache.KVBufferPool``, the eager loop's cache).
    stats: the engine's counters; a decoder adds its forwards, syncs and compactions.
    sync_every: steps between all-finished checks (None: 1 on CPU, 8 on a GPU; ``sync_every_on``).
    compact_finished: drop finished rows at those checks (eager loop only).
    compile_mode: ``torch.compile`` mode of the compiled step (None: "reduce-overhead" on CUDA).
    kv_bucket: static / compiled steps attend over the filled length rounded up to this multiple
        of 16 (None: the whole static cache); checked here, whatever the decode path.
    zero3: the module's parameters are ZeRO-3 partitioned (gathered anew by every call).
    """

    lm: torch.nn.Module
    config: PretrainedConfig
    pad_token_id: int
    max_seq_len: int
    kv_pool: KVBufferPool
    stats: EngineStats
    sync_every: Optional[int] = None
    compact_finished: bool = True
    compile_mode: Optional[str] = None
    share_prefill: bool = True
    """identical consecutive prompts share one prefill (eager path; ``engine/prefix_share.py``)."""
    kv_bucket: Optional[int] = None
    zero3: bool = False

    @property
    def logits_to_keep(self) -> bool:
        """Whether the model takes ``logits_to_keep`` (then the decoders ask for the last position's
        logits only). A PEFT ``PeftModel``'s forward takes ``**kwargs`` and hands them to the model
        it wraps: that model's signature decides (its own would say no)."""
        lm = self.lm
        while True:
            if "logits_to_keep" in inspect.signature(lm.forward).parameters:
                return True
            inner = lm.get_base_model() if hasattr(lm, "get_base_model") else None
            if inner is None or inner is lm:
                return False
            lm = inner

    def __post_init__(self):
        b = self.kv_bucket
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 16 or b % 16):
            raise ValueError(f"kv_bucket must be None or a positive multiple of 16, got {b!r}")

    def sync_every_on(self, device: torch.device) -> int:
        """Steps between all-finished checks on ``device``: a sync costs nothing on a CPU."""
        return self.sync_every or (1 if device.type == "cpu" else 8)


@runtime_checkable
class Decoder(Protocol):
    """Decodes one chunk of rows; ``DECODERS[name](ctx)`` builds one.

    ``decode`` gets the checked chunk: ids (b, P) int64 and mask (b, P) bool, left padded, b <=
    ``rows``; ``stop``: (n_stop,) int64 stop ids or None; ``seed``: () int64; ``row_offset``: the
    chunk's first row in the whole call (the rows' uniform draws follow it); ``rows``: the chunk
    size of this call (a decoder with fixed shapes pads to it). It returns (tokens, valid, logps),
    each (b, max_new_tokens): int64 tokens (pad after a row's stop), bool validity (a prefix), and
    float32 log-probs (0 where invalid). It is called under ``torch.no_grad`` with the model in
    eval mode and its parameters gathered.
    """

    def decode(self, ids: torch.Tensor, mask: torch.Tensor, params: SamplingParams, stop: Optional[torch.Tensor],
               seed: torch.Tensor, row_offset: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ...


@dataclass(frozen=True)
class AutoPreference:
    """How decode="auto" treats a registered decoder (its class attribute ``auto``; None: never).

    devices: the device types (``torch.device.type``) on which "auto" may choose it; ``("*",)``:
        any. Exactly one registered decoder has ``("*",)``: the base every "auto" engine builds,
        which the others fall back to.
    rank: among the built decoders that may run on a call's device, the highest rank is taken.
    compiles: the decoder compiles its step; once a compile failed (``stats.compile_error``) "auto"
        passes it over.
    takes_fallback: built with ``fallback=`` the base decoder (it hands a chunk it cannot decode
        to it, as ``compiled.CompiledDecoder`` does when compiling fails).
    """

    devices: tuple[str, ...]
    rank: int
    compiles: bool = False
    takes_fallback: bool = False

    def runs_on(self, device: torch.device) -> bool:
        return "*" in self.devices or device.type in self.devices


class DecoderType(Protocol):
    """A registered decoder class: built from a context, and able to say in advance why it cannot
    run with one (a model without a static cache, ZeRO-3 parameters a compiler cannot trace), and
    whether decode="auto" may choose it (``auto``, an ``AutoPreference`` or None)."""

    auto: Optional[AutoPreference]

    def __call__(self, ctx: DecoderContext) -> Decoder:
        ...

    def unsupported(self, ctx: DecoderContext) -> Optional[str]:
        """None if the decoder can run with ``ctx``, else why not and what to use, as the end of a
        sentence that starts "decode='<name>' " (e.g. "needs a plain static KV cache, but ...")."""
        ...


DECODERS: Registry[DecoderType] = Registry("decode path")


def decode_modes() -> tuple[str, ...]:
    """The values ``decode=`` accepts: "auto" and every registered decoder."""
    return ("auto", *DECODERS.names())


def _auto_base() -> str:
    """The one registered decoder "auto" may run on any device (the others' fallback)."""
    bases = [n for n in DECODERS if getattr(DECODERS[n], "auto", None) and "*" in DECODERS[n].auto.devices]
    if len(bases) != 1:
        raise ValueError(f"exactly one registered decoder must declare AutoPreference(devices=('*',), ...); "
                         f"found {bases}")
    return bases[0]


def build_decoders(decode: str, ctx: DecoderContext) -> dict[str, Decoder]:
    """The decoders an engine with ``decode=`` may use, built once (name -> decoder).

    A named path is built alone and raises if it cannot run with ``ctx``. "auto" builds the base
    decoder and every other decoder whose ``auto`` preference is set and that can run with ``ctx``
    (those that take a fallback get the base); ``auto_path`` picks among them per call."""
    if decode not in decode_modes():
        raise ValueError(f"decode must be one of {decode_modes()}, got {decode!r}")
    if decode != "auto":
        reason = DECODERS[decode].unsupported(ctx)
        if reason:
            raise ValueError(f"decode={decode!r} {reason}")
        return {decode: DECODERS[decode](ctx)}
    base = _auto_base()
    built = {base: DECODERS[base](ctx)}
    for name in DECODERS:
        cls = DECODERS[name]
        pref = getattr(cls, "auto", None)
        if name == base or pref is None or cls.unsupported(ctx) is not None:
            continue
        built[name] = cls(ctx, fallback=built[base]) if pref.takes_fallback else cls(ctx)
    return built


def auto_path(device: torch.device, built: dict[str, Decoder], stats: EngineStats) -> str:
    """decode="auto": of the built decoders whose preference allows ``device`` (and that have not
    failed to compile), the highest-ranked. With the built-in ones: "compiled" on CUDA when it was
    built (a plain static cache, no ZeRO-3) and has not failed to compile, "eager" otherwise (on a
    CPU a compiled step saves no launches)."""
    def usable(name: str) -> bool:
        pref = DECODERS[name].auto
        return pref.runs_on(device) and not (pref.compiles and stats.compile_error is not None)

    return max((n for n in built if usable(n)), key=lambda n: DECODERS[n].auto.rank)
