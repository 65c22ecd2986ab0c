"""Hybrid engine: KV-cached generation on the live training weights (no parameter copy), with
temperature / top-k / top-p sampling, per-row EOS / stop tokens, min / max new tokens, left-padded
prompts and seeded, reproducible sampling. See ``hybrid.HybridEngine``."""

from rlhf_fast.engine.cache import BufferedLayer, KVBufferPool
from rlhf_fast.engine.hybrid import EngineStats, GenerationOutput, HybridEngine
from rlhf_fast.engine.sampling import SamplingParams, filter_logits, sample_next

__all__ = [
    "BufferedLayer", "EngineStats", "GenerationOutput", "HybridEngine", "KVBufferPool", "SamplingParams",
    "filter_logits", "sample_next",
]
