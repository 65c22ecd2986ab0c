"""The built-in environments by name, and ``load_environment`` for ``ppo.env``.

A built-in environment registers itself here (``envs/calculator.py``: "tiny_calculator",
imported by ``rlhf_fast.envs``); a
user's environment is ``package.module:Class`` (any callable returning a fresh ``Environment``),
loaded as ``ppo.reward.function`` is."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from rlhf_fast._registry import Registry
from rlhf_fast.envs.protocol import Environment

EnvFactory = Callable[[], Environment]

ENVIRONMENTS: Registry[EnvFactory] = Registry("environment")


def import_user_module(module: str):
    """``importlib.import_module``, also from the current directory: the ``rlhf-fast`` console
    script, unlike ``python -m``, does not put it on sys.path, so ``my_rewards:fn`` or ``my_env:Env``
    next to the config would not be found. Used for ``ppo.env`` and ``ppo.reward.function``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name != module.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, cwd)
        return importlib.import_module(module)


def load_environment(spec: str) -> EnvFactory:
    """A registered name, or ``"package.module:Class"``: a factory that makes one fresh
    environment per call (one per episode). ValueError naming ``spec`` otherwise."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"ppo.env must be an environment name or 'package.module:Class', got {spec!r}")
    if ":" not in spec:
        return ENVIRONMENTS[spec]
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"ppo.env must look like 'package.module:Class', got {spec!r}")
    try:
        factory = getattr(import_user_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"ppo.env {spec!r} cannot be loaded: {e} (searched the current directory and sys.path)") from None
    if not callable(factory):
        raise ValueError(f"ppo.env {spec!r} is not callable (a class or a function returning an environment)")
    return factory
