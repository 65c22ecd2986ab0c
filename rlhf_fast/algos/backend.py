"""Which implementation of the RL math ops the algos call: the fused ``rlhf_fast.ops`` (default)
or the float64-capable oracle ``rlhf_fast.reference`` (same signatures: docs/architecture.md, "Numerical contract"). Resolved
lazily so that importing ``rlhf_fast.algos`` does not build the C++ ops."""

from __future__ import annotations


def resolve(backend=None):
    """``backend`` if given (any object with ``kl_penalty``, ``shape_rewards``, ``gae``,
    ``masked_whiten``), else ``rlhf_fast.ops``."""
    if backend is not None:
        return backend
    import rlhf_fast.ops as ops

    return ops
