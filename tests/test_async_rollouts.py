"""Asynchronous rollouts (``ppo.rollout``; trainers/async_rollout.py) end to end on the built-in task
(one trainer process, forked rollout workers, gloo): K = 0 with a worker is the synchronous run bit for
bit; K >= 1 samples each batch from the weights exactly K updates old (the staleness metric), keeps
the first minibatch's ratio exactly 1 against the proximal policy and the importance weights 1 up to
the engine-vs-trainer rounding gap where the staleness is 0; a dead worker is an error naming it; the workers stop with the trainer;
the weight sync's buckets round-trip over a real process group."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from rlhf_fast import config as C
from rlhf_fast.trainers import async_rollout
from rlhf_fast.trainers.async_rollout import StalenessSchedule
from rlhf_fast.trainers.ppo import PPOTrainer
from rlhf_fast.trainers.run.metrics_log import read_metrics

QUIET = ["--ppo.logging.progress_bar", "false", "--ppo.logging.tensorboard", "false"]
TINY = ["--ppo.policy.size", "test", "--ppo.reward.function", "task:gold", "--ppo.iterations", "4",
        "--ppo.rollout_batch_size", "8", "--ppo.generation.max_new_tokens", "8", "--ppo.eval_prompts", "8",
        "--ppo.logging.eval_every", "2", "--ppo.algo.num_minibatches", "2", "--ppo.algo.num_epochs", "2",
        "--ppo.critic", "value_head", "--ppo.optim.lr", "1e-3"]


def _cfg(*extra):
    return C.load_config(overrides=[*QUIET, *TINY, *extra]).ppo


def _train_rows(out):
    return [r for r in read_metrics(out) if "objective/kl" in r]


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "time/", "async/"))} for r in rows]


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync")
    PPOTrainer(_cfg(), out).fit()
    return out


def test_schedule_versions():
    s = StalenessSchedule(start=0, end=6, max_staleness=2, workers=2)
    assert [s.version_for(i) for i in range(6)] == [0, 0, 0, 1, 2, 3]
    assert s.last_version() == 3 and list(s.iterations_of(1)) == [1, 3, 5]
    assert [i for i in range(6) if s.sends_after(i)] == [0, 1, 2]  # versions 1, 2, 3
    resumed = StalenessSchedule(start=3, end=6, max_staleness=2, workers=1)
    assert [resumed.version_for(i) for i in range(3, 6)] == [3, 3, 3]  # in-flight batches were discarded
    assert not any(resumed.sends_after(i) for i in range(3, 6))


def test_k0_with_a_worker_is_the_synchronous_run(sync_run, tmp_path):
    PPOTrainer(_cfg("--ppo.rollout.workers", "1"), tmp_path).fit()
    rows = _train_rows(tmp_path)
    assert _comparable(rows) == _comparable(_train_rows(sync_run))
    assert all(r["async/staleness"] == 0.0 for r in rows)
    evals = [r for r in read_metrics(tmp_path) if "eval/gold_score" in r]
    assert len(evals) == 3 and _comparable(evals) == _comparable([r for r in read_metrics(sync_run) if "eval/gold_score" in r])


@pytest.mark.parametrize("k,workers,correction", [(1, 1, "decoupled"), (2, 2, "truncated_is")])
def test_stale_batches_are_corrected(k, workers, correction, tmp_path):
    cfg = _cfg("--ppo.rollout.workers", str(workers), "--ppo.rollout.max_staleness", str(k),
               "--ppo.rollout.correction", correction)
    PPOTrainer(cfg, tmp_path).fit()
    rows = _train_rows(tmp_path)
    # iteration i samples from the weights after max(0, i - k) updates, exactly
    assert [r["async/staleness"] for r in rows] == [float(min(i, k)) for i in range(4)]
    for r in rows:
        # the proximal log-probs are recomputed in the first epoch's micro-batches: first ratio exactly 1
        assert r["policy/first_minibatch_approxkl"] == 0.0 and r["policy/first_minibatch_clipfrac"] == 0.0
        assert all(math.isfinite(r[k_]) for k_ in ("async/is_weight_mean", "async/is_weight_max", "async/weight_sync_s"))
        if r["async/staleness"] == 0.0:  # same weights: the weights are 1 up to the engine-vs-trainer rounding gap
            bound = math.exp(r["generation/logprob_gap_max"]) * (1 + 1e-7)
            assert 1 / bound <= r["async/is_weight_min"] <= r["async/is_weight_max"] <= bound
            assert r["generation/logprob_gap_max"] < 1e-4
        else:
            assert "generation/logprob_gap_max" not in r  # other weights: not a rounding gap
    assert rows[-1]["async/is_weight_max"] - rows[-1]["async/is_weight_min"] > 1e-3  # a stale batch is off-policy
    assert rows[0]["async/weight_sync_mb"] > 0


def test_k1_repeats_itself(tmp_path):
    """Which weights sample which batch does not depend on timing: two runs give the same metrics."""
    args = ("--ppo.rollout.workers", "1", "--ppo.rollout.max_staleness", "1", "--ppo.iterations", "3")
    PPOTrainer(_cfg(*args), tmp_path / "a").fit()
    PPOTrainer(_cfg(*args), tmp_path / "b").fit()
    assert _comparable(_train_rows(tmp_path / "a")) == _comparable(_train_rows(tmp_path / "b"))


def test_dead_worker_is_an_error_naming_it(tmp_path, monkeypatch):
    real = async_rollout.RolloutStage.collect

    def dying(self, iteration, seed, timer=None):
        if iteration == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # a worker killed from outside: no traceback to send
        return real(self, iteration, seed, timer)

    monkeypatch.setattr(async_rollout.RolloutStage, "collect", dying)
    tr = PPOTrainer(_cfg("--ppo.rollout.workers", "1", "--ppo.rollout.max_staleness", "1"), tmp_path)
    with pytest.raises(RuntimeError, match=r"rollout worker 0 \(pid \d+\) died \(signal 9\)"):
        tr.fit()
    assert tr.async_rollouts is None  # closed


def test_worker_exception_is_raised_naming_it(tmp_path, monkeypatch):
    def failing(self, iteration, seed, timer=None):
        raise ValueError("boom in the scorer")

    monkeypatch.setattr(async_rollout.RolloutStage, "collect", failing)
    tr = PPOTrainer(_cfg("--ppo.rollout.workers", "1"), tmp_path)
    with pytest.raises(RuntimeError, match=r"(?s)rollout worker 0 \(pid \d+\) failed:.*boom in the scorer"):
        tr.fit()


def test_bad_settings_named():
    with pytest.raises(ValueError, match="max_staleness 1 needs ppo.rollout.workers"):
        _cfg("--ppo.rollout.max_staleness", "1")
    with pytest.raises(ValueError, match="old_logprobs 'rollout' with ppo.rollout.max_staleness"):
        _cfg("--ppo.rollout.max_staleness", "1", "--ppo.rollout.workers", "1", "--ppo.old_logprobs", "rollout")
    with pytest.raises(ValueError, match="zero_stage 0-2"):
        _cfg("--ppo.rollout.workers", "1", "--ppo.deepspeed.zero_stage", "3")
