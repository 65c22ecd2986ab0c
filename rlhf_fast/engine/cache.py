"""The engine's KV cache: preallocated buffers that live as long as the engine.

``KVBufferPool`` owns, per attention layer, one ``(max_batch_size, kv_heads, max_seq_len,
head_dim)`` key buffer and one value buffer, allocated on the first call and reused by every later
call (reallocated only if the dtype, device or head shape changes). ``BufferedLayer`` plugs them
into Hugging Face's cache API: it is a ``DynamicLayer`` whose ``update`` writes the new keys /
values in place and returns views of the filled prefix, so:

- nothing is concatenated per step (HF's ``DynamicCache`` re-allocates and copies every layer's
  whole cache at every token: O(L^2) bytes over a response);
- attention reads only the filled prefix (a static cache attends over ``max_seq_len`` every step);
- finished rows are dropped by compacting the live rows to the front of the buffers.

Sliding-window or other special layers keep HF's own classes (the pool only replaces plain
``DynamicLayer`` entries), so any HF causal LM still works.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class KVBufferPool:
    """Per-layer K / V storage shared by every ``generate`` call of one engine."""

    def __init__(self, max_batch_size: int, max_seq_len: int):
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self._buffers: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        self.allocations = 0  # how many buffer pairs were ever allocated (tests check reuse)

    def get(self, layer_idx: int, key_like: torch.Tensor, value_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads, k_dim, v_dim = key_like.shape[1], key_like.shape[-1], value_like.shape[-1]
        spec = (heads, k_dim, v_dim, key_like.dtype, key_like.device)
        entry = self._buffers.get(layer_idx)
        if entry is None or entry[0] != spec:
            shape = (self.max_batch_size, heads, self.max_seq_len)
            k = torch.empty(*shape, k_dim, dtype=key_like.dtype, device=key_like.device)
            v = torch.empty(*shape, v_dim, dtype=value_like.dtype, device=value_like.device)
            entry = (spec, k, v)
            self._buffers[layer_idx] = entry
            self.allocations += 1
        return entry[1], entry[2]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for _, k, v in self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


class BufferedLayer(DynamicLayer):
    """A ``DynamicLayer`` backed by a ``KVBufferPool`` buffer: ``keys`` / ``values`` are views
    ``buffer[:batch, :, :length]``."""

    def __init__(self, pool: KVBufferPool, layer_idx: int):
        super().__init__()
        self._pool, self._layer_idx = pool, layer_idx
        self._len = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._kbuf, self._vbuf = self._pool.get(self._layer_idx, key_states, value_states)
        self._len = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, n = key_states.shape[0], key_states.shape[-2]
        end = self._len + n
        if end > self._kbuf.shape[2] or b > self._kbuf.shape[0]:
            raise RuntimeError(f"KV cache overflow: {b} rows x {end} positions > buffer {tuple(self._kbuf.shape[:3])}")
        self._kbuf[:b, :, self._len : end].copy_(key_states)
        self._vbuf[:b, :, self._len : end].copy_(value_states)
        self._len = end
        self.keys, self.values = self._kbuf[:b, :, :end], self._vbuf[:b, :, :end]
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return self._len if self.is_initialized else 0

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._len = 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps rows ``indices`` (sorted), moved to the front of the buffers."""
        if not self.is_initialized or self._len == 0:
            return
        n, L = indices.numel(), self._len
        # advanced indexing on the right copies first, so overlapping rows are safe
        self._kbuf[:n, :, :L] = self._kbuf[indices, :, :L]
        self._vbuf[:n, :, :L] = self._vbuf[indices, :, :L]
        self.keys, self.values = self._kbuf[:n, :, :L], self._vbuf[:n, :, :L]

    def crop(self, *args, **kwargs):  # not used by the engine
        raise NotImplementedError("BufferedLayer does not support crop")

    def batch_repeat_interleave(self, *args, **kwargs):
        raise NotImplementedError("BufferedLayer does not support batch_repeat_interleave")


def make_cache(config, pool: KVBufferPool) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain full-attention layers use ``pool``'s buffers."""
    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = BufferedLayer(pool, i)
    return cache


def select_rows(cache: DynamicCache, indices: torch.Tensor) -> None:
    """Keeps batch rows ``indices`` in every layer of ``cache``."""
    for layer in cache.layers:
        layer.batch_select_indices(indices)
