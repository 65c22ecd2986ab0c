"""``make_generator``: the one call a trainer makes to get a ``generator.Generator``.

Today every decode path runs on the live training weights, so the factory returns a
``hybrid.HybridEngine`` with the chosen decoder (``decode=``: "auto" or a name registered in
``generator.DECODERS``). A backend that keeps its own copy of the weights would be a new
``Generator`` class chosen here, with ``on_weights_updated`` doing its sync.
"""

from __future__ import annotations

from typing import Optional

from rlhf_fast.engine.generator import Generator
from rlhf_fast.engine.hybrid import HybridEngine


def make_generator(model, *, pad_token_id: int, max_batch_size: int, max_seq_len: int, decode: str = "auto",
                   sync_every: Optional[int] = None, compact_finished: bool = True, compile_mode: Optional[str] = None,
                   kv_bucket: Optional[int] = None) -> Generator:
    """A generator for ``model`` (a HF causal LM, a ``Policy`` or a DeepSpeed engine around either);
    the arguments are ``HybridEngine``'s. Raises ValueError naming the problem for a decode path
    that is unknown or cannot run with this model."""
    return HybridEngine(model, pad_token_id=pad_token_id, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                        decode=decode, sync_every=sync_every, compact_finished=compact_finished,
                        compile_mode=compile_mode, kv_bucket=kv_bucket)
