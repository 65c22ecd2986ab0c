"""OpenMP's wait policy (rlhf_fast/_threads.py, issue 23): passive by default when rlhf_fast is
imported before torch, the user's own setting untouched, and nothing changed once torch is loaded."""

from __future__ import annotations

import os
import subprocess
import sys

from rlhf_fast._threads import DEFAULT_WAIT_POLICY, set_default_wait_policy


def test_default_is_passive_before_torch_loads():
    env = {}
    assert set_default_wait_policy(env, modules={}) == DEFAULT_WAIT_POLICY == "PASSIVE"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_users_setting_wins():
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert set_default_wait_policy(env, modules={}) == "ACTIVE" and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    env = {"GOMP_SPINCOUNT": "10000"}
    assert set_default_wait_policy(env, modules={}) == "GOMP_SPINCOUNT=10000" and "OMP_WAIT_POLICY" not in env


def test_torch_loaded_first_changes_nothing():
    env = {}
    assert set_default_wait_policy(env, modules={"torch": object()}) is None and env == {}


def _child_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **extra}


def test_the_cli_process_gets_it_before_libgomp_starts():
    """In a fresh interpreter importing rlhf_fast (as the `rlhf-fast` entry point does) sets the
    policy before torch loads libgomp: the variable is in the process environment when torch is
    imported."""
    code = ("import os, rlhf_fast, torch; torch.ones(4096).sum(); "
            "print(os.environ.get('OMP_WAIT_POLICY'), rlhf_fast._threads.WAIT_POLICY)")
    out = subprocess.run([sys.executable, "-c", code], env=_child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "PASSIVE"]
    out = subprocess.run([sys.executable, "-c", code], env=_child_env(OMP_WAIT_POLICY="active"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["active", "active"]
