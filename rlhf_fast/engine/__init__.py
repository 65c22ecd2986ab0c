"""Hybrid engine: KV-cached generation on the live training weights (no parameter copy), with
temperature / top-k / top-p sampling, per-row EOS / stop tokens, min / max new tokens, left-padded
prompts and seeded, reproducible sampling.

``generator.Generator`` is the interface a trainer uses (``make_generator`` builds one from the
backend registry ``factory.BACKENDS``: "hybrid" or "hf_generate");
``hybrid.HybridEngine`` implements it with a decode path from ``generator.DECODERS``: eager
(``eager.py``), static (``static.py``) or compiled (``compiled.py``)."""

from rlhf_fast.engine.cache import BufferedLayer, KVBufferPool
from rlhf_fast.engine.factory import BACKENDS, Backend, backend_names, make_generator
from rlhf_fast.engine.generator import (
    DECODERS,
    Decoder,
    DecoderContext,
    EngineStats,
    GenerationOutput,
    Generator,
    decode_modes,
)
from rlhf_fast.engine.hybrid import HybridEngine
from rlhf_fast.engine.sampling import SamplingParams, filter_logits, sample_next

__all__ = [
    "BACKENDS", "DECODERS", "Backend", "BufferedLayer", "Decoder", "DecoderContext", "EngineStats", "GenerationOutput", "Generator",
    "HybridEngine", "KVBufferPool", "SamplingParams", "backend_names", "decode_modes", "filter_logits", "make_generator", "sample_next",
]
