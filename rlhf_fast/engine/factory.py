"""``make_generator``: the one call a trainer makes to get a ``generator.Generator``, and the registry
of generation backends it picks from (``ppo.generation.backend``; docs/architecture.md,
"Generation backends").

A backend is one file with a builder plus one ``BACKENDS`` line here. Its entry says what the
trainer must know without comparing names: whether its log-probs are the trainer's own numbers
(``logprobs_match_trainer``; if not, ``ppo.old_logprobs: rollout`` is refused and the trainer
recomputes the old log-probs, logging the gap).

- "hybrid" (the default): ``hybrid.HybridEngine``, KV-cached generation on the live training
  weights with a decoder from ``generator.DECODERS`` (``decode=``);
- "hf_generate": ``hf_generate.HFGenerateBackend``, Hugging Face ``generate`` on a synced copy of
  the weights: the shape of a separate inference engine (vLLM, SGLang), runnable on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from rlhf_fast._registry import Registry
from rlhf_fast.engine import hf_generate
from rlhf_fast.engine.generator import Generator
from rlhf_fast.engine.hybrid import HybridEngine


@dataclass(frozen=True)
class Backend:
    """A generation backend: ``build(model, *, pad_token_id, max_batch_size, max_seq_len, decode,
    **hybrid tuning)`` returns a ``Generator``; ``logprobs_match_trainer`` as on the Generator."""

    build: Callable[..., Generator]
    logprobs_match_trainer: bool
    runs_episodes: bool = False
    """its generator has ``run_episodes`` (multi-turn episodes against an environment, ``ppo.env``;
    docs/architecture.md, "Multi-turn episodes"); the config refuses ``ppo.env`` with a backend without."""


BACKENDS: Registry[Backend] = Registry("generation backend")
BACKENDS.register("hybrid")(Backend(HybridEngine, logprobs_match_trainer=True, runs_episodes=True))
BACKENDS.register("hf_generate")(Backend(hf_generate.build, logprobs_match_trainer=False))


def backend_names() -> tuple[str, ...]:
    """The values ``ppo.generation.backend`` accepts."""
    return BACKENDS.names()


def make_generator(model, *, pad_token_id: int, max_batch_size: int, max_seq_len: int, decode: str = "auto",
                   backend: str = "hybrid", sync_every: Optional[int] = None, compact_finished: bool = True,
                   compile_mode: Optional[str] = None, kv_bucket: Optional[int] = None) -> Generator:
    """A generator for ``model`` (a HF causal LM, a ``Policy`` or a DeepSpeed engine around either)
    from the backend registered as ``backend``; the other arguments are ``HybridEngine``'s (a
    backend rejects those it cannot honour). Raises ValueError naming the problem for an unknown
    backend or decode path, or one that cannot run with this model."""
    entry = BACKENDS[backend]
    tuning = {}  # only what differs from the defaults, so a backend without these knobs can refuse them
    if sync_every is not None:
        tuning["sync_every"] = sync_every
    if not compact_finished:
        tuning["compact_finished"] = compact_finished
    if compile_mode is not None:
        tuning["compile_mode"] = compile_mode
    if kv_bucket is not None:
        tuning["kv_bucket"] = kv_bucket
    gen = entry.build(model, pad_token_id=pad_token_id, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                      decode=decode, **tuning)
    if gen.logprobs_match_trainer != entry.logprobs_match_trainer:
        raise ValueError(f"generation backend {backend!r}: its registry entry and its generator disagree on "
                         "logprobs_match_trainer")
    return gen
