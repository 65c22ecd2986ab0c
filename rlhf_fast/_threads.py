"""How torch's OpenMP threads wait between parallel regions (issue 23, thread hygiene).

libgomp's default (``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` unset) keeps every worker thread
busy-spinning for 300000 iterations after each parallel region before it sleeps. A PPO or SFT step
runs thousands of small parallel regions, so a process spends its idle cores spinning; alone on its
cores that costs nothing, but when the machine is oversubscribed (two runs on two cores, a run
next to a test suite) the spinning threads take the time slices the other process's working
threads need, and both crawl (issue 23: one SFT stage went from 75 s to 28 min with 3-4
processes on 2 cores). Passive waiting (threads sleep on a futex as soon as they are idle) keeps
an oversubscribed machine near its fair share; ``benchmarks/bench_contention.py`` measures both
policies alone and next to a competing process.

The policy is read once, when libgomp starts (i.e. when torch is first imported), so this module
must run before ``import torch``: ``rlhf_fast/__init__.py`` imports it first, which covers the
``rlhf-fast`` command line and any script that imports rlhf_fast before torch. A user's own
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` always wins.
"""

from __future__ import annotations

import os
import sys

DEFAULT_WAIT_POLICY = "PASSIVE"


def set_default_wait_policy(environ=os.environ, modules=sys.modules) -> str | None:
    """Sets ``OMP_WAIT_POLICY`` to the default when the user set neither it nor ``GOMP_SPINCOUNT``
    and torch (hence libgomp) is not loaded yet; returns the policy in effect, None if unknown (torch
    was imported first with nothing set: libgomp's own spinning default applies)."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return environ.get("OMP_WAIT_POLICY") or f"GOMP_SPINCOUNT={environ['GOMP_SPINCOUNT']}"
    if "torch" in modules:
        return None
    environ["OMP_WAIT_POLICY"] = DEFAULT_WAIT_POLICY
    return DEFAULT_WAIT_POLICY


WAIT_POLICY = set_default_wait_policy()
