"""The registry class, re-exported: it lives in ``rlhf_fast/_registry.py`` so that the engine,
which sits beside ``algos`` in the layering, uses the same class without importing ``algos``."""

from rlhf_fast._registry import Registry

__all__ = ["Registry"]
