"""glibc's malloc policy (rlhf_fast/_malloc.py, issue 35 part 5): applied on import, the user's own
setting untouched, ``RLHF_FAST_MALLOC_POLICY=off`` opts out; checked by what glibc then does (which
blocks it mmaps, what it keeps) in fresh interpreters, and by the recorder for the decision alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_fast import _malloc
from rlhf_fast._malloc import MMAP_THRESHOLD, POLICY_ENV, STEADY, TRIM_THRESHOLD, set_default_malloc_policy

ROOT = Path(__file__).resolve().parents[1]
glibc_only = pytest.mark.skipif(not _malloc._glibc(), reason="the policy applies to glibc only (no-op elsewhere)")


class _Recorder:
    def __init__(self, ret=1):
        self.calls, self.ret = [], ret

    def __call__(self, param, value):
        self.calls.append((param, value))
        return self.ret


def test_default_sets_both_thresholds():
    rec = _Recorder()
    assert set_default_malloc_policy({}, rec) == STEADY
    assert rec.calls == [(-3, 32 * 2**20), (-1, 2**30)] == [(-3, MMAP_THRESHOLD), (-1, TRIM_THRESHOLD)]
    assert set_default_malloc_policy({POLICY_ENV: " Steady "}, rec) == STEADY


@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "65536"}, {"MALLOC_TRIM_THRESHOLD_": "0"},
                                 {"MALLOC_ARENA_MAX": "2"}, {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4096"},
                                 {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_users_setting_wins(env):
    rec = _Recorder()
    assert set_default_malloc_policy(env, rec).startswith("user: ") and rec.calls == []


def test_unrelated_tunables_and_preloads_do_not_count():
    rec = _Recorder()
    env = {"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "LD_PRELOAD": "/usr/lib/libfaketime.so"}
    assert set_default_malloc_policy(env, rec) == STEADY and len(rec.calls) == 2


def test_opt_out_and_bad_value():
    rec = _Recorder()
    assert set_default_malloc_policy({POLICY_ENV: "off"}, rec).startswith("glibc defaults") and rec.calls == []
    with pytest.raises(ValueError, match="RLHF_FAST_MALLOC_POLICY='fast'.*'steady'.*'off'"):
        set_default_malloc_policy({POLICY_ENV: "fast"}, rec)


def test_refused_mallopt_is_reported():
    assert set_default_malloc_policy({}, _Recorder(ret=0)) == "glibc defaults (mallopt refused the policy)"


# A fresh interpreter imports rlhf_fast (as the CLI does), then asks glibc (mallinfo2) whether a
# 1 MiB and a 24 MiB block are mmapped, and whether 8 MiB freed at the heap top are kept.
_PROBE = """
import ctypes, rlhf_fast, torch
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype = MI2, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
torch.ones(4096).sum()
def mmapped(n):
    before = libc.mallinfo2().hblks
    p = libc.malloc(n)
    now = libc.mallinfo2().hblks
    libc.free(p)
    return now > before
p = libc.malloc(8 << 20); libc.free(p)
print(mmapped(1 << 20), mmapped(24 << 20), mmapped(40 << 20), libc.mallinfo2().keepcost >= 8 << 20)
print(rlhf_fast._malloc.MALLOC_POLICY)
"""


def _child(**extra) -> list[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in (POLICY_ENV, "GLIBC_TUNABLES", "LD_PRELOAD")}
    env = {**env, "PYTHONPATH": str(ROOT), **extra}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


@glibc_only
def test_import_sets_the_policy_in_a_fresh_process():
    facts, policy = _child()
    # Up to 32 MiB from the heap, 40 MiB still mmapped, the freed 8 MiB top kept for reuse.
    assert facts.split() == ["False", "False", "True", "True"] and policy == STEADY


@glibc_only
def test_users_malloc_variable_is_not_overridden():
    facts, policy = _child(MALLOC_MMAP_THRESHOLD_="65536")
    # The user's 64 KiB threshold holds: even 1 MiB is mmapped (the policy would have put it in the heap).
    assert facts.split()[:3] == ["True", "True", "True"] and policy == "user: MALLOC_MMAP_THRESHOLD_=65536"


@glibc_only
def test_opt_out_keeps_glibc_defaults():
    facts, policy = _child(**{POLICY_ENV: "off"})
    # glibc's dynamic threshold never passes what was freed so far: 24 MiB is mmapped, and 8 MiB at
    # the top is trimmed (the trim threshold is twice the mmap threshold, well under 8 MiB here).
    assert facts.split()[1:] == ["True", "True", "False"] and policy == f"glibc defaults ({POLICY_ENV}=off)"


_SAME_NUMBERS = """
import hashlib, torch
from rlhf_fast import ops
g = torch.Generator().manual_seed(0)
r, v = torch.randn(512, 1024, generator=g), torch.randn(512, 1024, generator=g)
mask = torch.rand(512, 1024, generator=g) < 0.9
adv, ret = ops.gae(r, v, mask, gamma=0.99, lam=0.95)
w = ops.masked_whiten(adv, mask)
lp = ops.gather_logprobs(torch.randn(256, 3000, generator=g), torch.randint(0, 3000, (256,), generator=g))
print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in (adv, ret, w, lp))).hexdigest())
"""


@glibc_only
def test_policy_changes_no_number():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != POLICY_ENV}
    digests = []
    for extra in ({}, {POLICY_ENV: "off"}):
        out = subprocess.run([sys.executable, "-c", _SAME_NUMBERS], env={**env, "PYTHONPATH": str(ROOT), **extra},
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        digests.append(out.stdout.strip())
    assert digests[0] == digests[1] and len(digests[0]) == 64
