"""glibc's malloc policy for multi-MB tensors (issue 35, part 5: what users run is what records measure).

torch's CPU allocator takes every tensor from ``malloc``. glibc serves a request above its mmap
threshold with fresh ``mmap`` pages and raises that threshold (up to 32 MiB) to the size of each
mmapped block freed; the trim threshold follows at twice it, and whenever the free space at the top
of the heap passes it, the heap is handed back to the OS. An op whose outputs are 128 KB-32 MB
then lands, in some heap layouts, exactly on that edge: its outputs come from the heap top, are
freed, the top passes the trim threshold, the pages are returned, and the next call page-faults
them in again. Measured (issue 35): ``ops.gae`` at [512, 1024] in a process that had first run the
same op at [64, 1024] took ~2.4 ms with 992 minor faults per call, against ~0.35 ms and none with
the policy below; a PPO process runs many ops of these sizes after other work, so it pays this
where a fresh benchmark process does not.

The policy: ``mallopt(M_MMAP_THRESHOLD, 32 MiB)`` (requests up to 32 MiB come from the heap, and
the threshold stops moving) and ``mallopt(M_TRIM_THRESHOLD, 1 GiB)`` (freed heap memory is kept
for reuse up to 1 GiB before it is returned). Cost: after a peak, the process's resident memory can
stay up to ~1 GiB above what it holds live, and blocks below 32 MiB share the heap (more
fragmentation possible); blocks above 32 MiB (a logits tensor, a model's weights) are mmapped as
before. It changes where memory comes from, never a value: no numeric result depends on it.

When: on ``import rlhf_fast`` (``rlhf_fast/__init__.py``), not only in the CLI or the trainers. A
user's own script that calls ``rlhf_fast.ops`` inside another training loop allocates the same
outputs, and the benchmarks, which import rlhf_fast, then measure what every user gets.
``mallopt`` acts on later allocations whenever it is called, so unlike ``_threads`` the import
order relative to torch does not matter.

Left alone (the user's choice wins): any ``MALLOC_*`` variable glibc reads
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_``,
``MALLOC_ARENA_MAX``, ...), a ``glibc.malloc.*`` entry in ``GLIBC_TUNABLES``, a preloaded malloc
(``LD_PRELOAD`` naming jemalloc, tcmalloc or mimalloc), or ``RLHF_FAST_MALLOC_POLICY=off``. Not
glibc (macOS, musl, Windows): nothing is done.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 32 << 20
"""Bytes; glibc's own ceiling for its dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)."""
TRIM_THRESHOLD = 1 << 30
"""Bytes of free heap top kept before returning memory to the OS."""
POLICY_ENV = "RLHF_FAST_MALLOC_POLICY"
"""``steady`` (the default when unset) applies the policy, ``off`` leaves glibc's defaults."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
_PRELOADED_MALLOCS = ("jemalloc", "tcmalloc", "mimalloc")
STEADY = f"glibc mallopt: mmap_threshold {MMAP_THRESHOLD >> 20} MiB, trim_threshold {TRIM_THRESHOLD >> 30} GiB"


def _users_choice(environ) -> str | None:
    """What the user set about malloc themselves, None if nothing."""
    mine = sorted(k for k in environ if k.startswith("MALLOC_"))
    if mine:
        return "user: " + " ".join(f"{k}={environ[k]}" for k in mine)
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t.startswith("glibc.malloc.")]
    if tunables:
        return "user: GLIBC_TUNABLES " + ":".join(tunables)
    preload = environ.get("LD_PRELOAD", "")
    if any(name in preload for name in _PRELOADED_MALLOCS):
        return f"user: LD_PRELOAD={preload}"
    return None


def _glibc():
    """glibc's ``mallopt`` entry point, or None when this process does not run on glibc."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL(None).mallopt  # the process's own libc (the one torch allocates from)
    except (ValueError, OSError, AttributeError):  # no such confstr name (not glibc), no symbol
        return None


def set_default_malloc_policy(environ=os.environ, mallopt=None) -> str:
    """Applies the policy unless the user chose otherwise; returns what is in effect, in words
    (benchmark records store it). ``mallopt`` defaults to glibc's (tests pass a recorder)."""
    switch = environ.get(POLICY_ENV, "steady").strip().lower()
    if switch not in ("steady", "off"):
        raise ValueError(f"{POLICY_ENV}={environ[POLICY_ENV]!r}: expected 'steady' (the default) or 'off'")
    if switch == "off":
        return f"glibc defaults ({POLICY_ENV}=off)"
    users = _users_choice(environ)
    if users is not None:
        return users
    mallopt = mallopt if mallopt is not None else _glibc()
    if mallopt is None:
        return "not glibc: the platform's allocator, untouched"
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return STEADY if ok else "glibc defaults (mallopt refused the policy)"


MALLOC_POLICY = set_default_malloc_policy()
