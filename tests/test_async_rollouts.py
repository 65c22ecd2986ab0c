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
    assert _cfg("--ppo.rollout.max_staleness", "1").rollout.worker_count == 1  # one worker unless told
    assert _cfg().rollout.worker_count == 0
    with pytest.raises(ValueError, match="max_staleness 1 needs ppo.rollout.workers"):
        _cfg("--ppo.rollout.max_staleness", "1", "--ppo.rollout.workers", "0")
    with pytest.raises(ValueError, match="old_logprobs 'rollout' with ppo.rollout.max_staleness"):
        _cfg("--ppo.rollout.max_staleness", "1", "--ppo.rollout.workers", "1", "--ppo.old_logprobs", "rollout")
    with pytest.raises(ValueError, match="zero_stage 0-2"):
        _cfg("--ppo.rollout.workers", "1", "--ppo.deepspeed.zero_stage", "3")


# ---- the settings it must work with (a representative subset) ---------------------------------------


@pytest.mark.parametrize("name,extra,presets", [
    ("separate critic, ZeRO-2", ("--ppo.critic", "separate", "--ppo.deepspeed.zero_stage", "2"), ()),
    ("LoRA, packed", ("--ppo.lora.rank", "4", "--ppo.packing", "true"), ()),
    ("grpo preset", ("--ppo.samples_per_prompt", "2", "--ppo.rollout_batch_size", "4"), ("grpo",)),
])
def test_k1_runs_with(name, extra, presets, tmp_path):
    cfg = C.load_config(presets=presets, overrides=[*QUIET, *TINY, "--ppo.iterations", "3", "--ppo.rollout.workers",
                                                    "1", "--ppo.rollout.max_staleness", "1", *extra]).ppo
    tr = PPOTrainer(cfg, tmp_path)
    tr.fit()
    rows = _train_rows(tmp_path)
    assert [r["async/staleness"] for r in rows] == [0.0, 1.0, 1.0], name
    assert all(r["policy/first_minibatch_approxkl"] == 0.0 for r in rows), name
    assert all(math.isfinite(r["loss/policy"]) and math.isfinite(r["async/is_weight_mean"]) for r in rows), name
    params = list(tr.policy_engine.module.parameters())
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    assert rows[0]["async/weight_sync_mb"] * 2**20 == trainable  # what travels: the trainable parameters
    if cfg.lora.rank:  # only the adapters (and the value head), not the base model
        assert trainable < 0.5 * sum(p.numel() * p.element_size() for p in params)


def _sync_peer(port, out):
    from rlhf_fast.trainers.weight_sync import WeightSync, join_group, make_store

    params = [torch.zeros(5), torch.zeros(2), torch.zeros(3, 2, dtype=torch.float64), torch.zeros(7)]
    store = make_store("127.0.0.1", port, 2, timeout_s=60, is_master=False)
    sync = WeightSync(params, join_group(store, 1, 2, timeout_s=60), bucket_bytes=32)
    sync.recv()
    out.put([p.clone() for p in params])
    sync.recv()
    out.put([p.clone() for p in params])


def test_weight_sync_buckets_round_trip():
    """Two versions through a real gloo group: buckets split by size and dtype, every tensor arrives
    as sent, and a parameter changed while a broadcast is in flight does not corrupt it (a copy travels)."""
    import multiprocessing as mp

    from rlhf_fast.trainers.weight_sync import WeightSync, join_group, make_store

    ctx = mp.get_context("fork")
    out = ctx.Queue()
    store = make_store("127.0.0.1", 0, 2, timeout_s=60, is_master=True)
    peer = ctx.Process(target=_sync_peer, args=(store.port, out), daemon=True)
    peer.start()
    try:
        params = [torch.arange(5.0), torch.tensor([0.5, 2.5]), torch.arange(6, dtype=torch.float64).reshape(3, 2),
                  torch.arange(7.0) * -1]
        sync = WeightSync(params, join_group(store, 0, 2, timeout_s=60), bucket_bytes=32)
        assert [len(b.params) for b in sync.buckets] == [2, 1, 1]  # 20 + 8 B <= 32 B; a float64 one apart
        assert sync.stats.bytes == 5 * 4 + 2 * 4 + 6 * 8 + 7 * 4
        sent = [p.clone() for p in params]
        sync.send()
        for p in params:
            p.add_(100.0)  # the optimizer moves on while the first version travels
        got = out.get(timeout=60)
        assert all(torch.equal(a, b) for a, b in zip(got, sent))
        sync.send()
        got = out.get(timeout=60)
        assert all(torch.equal(a, b) for a, b in zip(got, params))
        sync.wait()
    finally:
        peer.join(30)
        if peer.is_alive():
            peer.kill()
    assert peer.exitcode == 0


def test_resume_discards_batches_in_flight(tmp_path):
    """A checkpoint holds no batches in flight: the resumed run restarts its workers from the
    checkpoint's weights, so its first batch has staleness 0, and it repeats itself."""
    args = ("--ppo.rollout.workers", "1", "--ppo.rollout.max_staleness", "1")
    for d in ("a", "b"):
        PPOTrainer(_cfg(*args, "--ppo.stop_after_iterations", "2"), tmp_path / d).fit()
        PPOTrainer(_cfg(*args), tmp_path / d, resume=True).fit()
    rows = _train_rows(tmp_path / "a")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["async/staleness"] for r in rows] == [0.0, 1.0, 0.0, 1.0]
    assert _comparable(rows) == _comparable(_train_rows(tmp_path / "b"))


_TRAINER = """
import sys
from rlhf_fast import config as C
from rlhf_fast.trainers.ppo import PPOTrainer
cfg = C.load_config(overrides=sys.argv[2:]).ppo
PPOTrainer(cfg, sys.argv[1]).fit()
"""


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:  # field 4: the parent's pid
                        kids.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_workers_stop_when_the_trainer_process_dies(sig, tmp_path):
    """A trainer killed from outside (no Python cleanup at all under SIGKILL) takes its rollout
    workers with it (PR_SET_PDEATHSIG): none is left running."""
    import subprocess
    import sys
    import time

    args = [*QUIET, *TINY, "--ppo.iterations", "400", "--ppo.rollout.max_staleness", "1"]
    # a fresh 1-rank group of its own: not the process-group variables an earlier in-process run left
    drop = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "trainer.log", "w")
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, str(tmp_path / "run"), *args], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "run" / "metrics.jsonl").exists() or not _children(trainer.pid):
            assert trainer.poll() is None and time.time() < deadline, \
                "the trainer never started its worker:\n" + (tmp_path / "trainer.log").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1.0)
        workers = _children(trainer.pid)
        assert workers
        trainer.send_signal(sig)
        trainer.wait(60)
        deadline = time.time() + 30
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "a rollout worker outlived its trainer"
    finally:
        if trainer.poll() is None:
            trainer.kill()
        log.close()


def test_ctrl_c_stops_after_the_step_and_stops_the_workers(tmp_path, monkeypatch):
    """A terminal's Ctrl-C reaches the trainer and its workers: the workers ignore it (they keep
    delivering), the trainer stops after the step with its checkpoint, and no worker is left."""
    from rlhf_fast.trainers.run.guard import Interrupted

    original, seen, pids = PPOTrainer.run_step, [], []

    def interrupted_in_the_second(self):
        seen.append(self.step)
        if len(seen) == 2:
            pids.extend(p.pid for p in self.async_rollouts.procs)
            for pid in pids:
                os.kill(pid, signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(PPOTrainer, "run_step", interrupted_in_the_second)
    tr = PPOTrainer(_cfg("--ppo.rollout.max_staleness", "1", "--ppo.logging.eval_every", "0"), tmp_path)
    with pytest.raises(Interrupted, match="Ctrl-C"):
        tr.fit()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert [r["step"] for r in _train_rows(tmp_path)] == [1, 2]
    assert pids and not any(_alive(pid) for pid in pids)
