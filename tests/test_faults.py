"""Runs survive the cluster (issue 31), on the CPU: a pipeline sent SIGTERM during PPO stops after
its iteration with a checkpoint and exit status 75, and --resume ends with the metrics of an
uninterrupted run; SIGUSR1 past the grace period stops at once; a checkpoint that fails its
manifest is skipped for the previous one; a full disk during a save leaves the previous
checkpoint loadable (exit 74); a 2-rank torchrun job whose rank 1 alone gets SIGTERM stops on both
ranks after the same step (exit 75 on each); one whose rank 1 is SIGKILLed mid-step stops with an
error naming rank 1 and the last completed step (exit 76); checkpoints written by 2 ranks resume
on 1 and the other way round (SFT at ZeRO-2 and ZeRO-3, PPO at ZeRO-2)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import _ppo_dist_worker
import pytest
import torch

from rlhf_fast import config as C
from rlhf_fast.cli import main
from rlhf_fast.trainers.run.checkpoints import Checkpointer, latest_checkpoint
from rlhf_fast.trainers.run.metrics_log import read_metrics
from rlhf_fast.trainers.sft import SFTTrainer

REPO = Path(__file__).resolve().parents[1]
QUIET = [f"--{s}.logging.{f}" for s in ("sft", "rm", "ppo") for f in ("progress_bar", "tensorboard")]
QUIET = [x for flag in QUIET for x in (flag, "false")]
PIPELINE = ["pipeline", "--preset", "ci", *QUIET,
            "--sft.max_steps", "3", "--sft.data.max_train_examples", "192", "--sft.data.max_eval_examples", "32",
            "--rm.max_steps", "3", "--rm.data.max_train_examples", "192", "--rm.data.max_eval_examples", "32",
            "--rm.normalization_samples", "16", "--ppo.iterations", "4", "--ppo.rollout_batch_size", "8",
            "--ppo.eval_prompts", "8", "--ppo.logging.eval_every", "2", "--ppo.generation.max_new_tokens", "8"]
SFT = ["sft", "--preset", "ci", *QUIET[:4], "--sft.model.size", "test", "--sft.model.config_overrides", "{}",
       "--sft.batch_size", "16", "--sft.micro_batch_size", "8", "--sft.data.max_train_examples", "160",
       "--sft.data.max_eval_examples", "16", "--sft.eval_batch_size", "16", "--sft.logging.log_every", "1"]

PPO = list(_ppo_dist_worker.OVERRIDES)  # greedy rollouts: the same rows whatever rank decodes them


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", RLHF_FAST_NO_TQDM="1", PYTHONPATH=str(REPO))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(REPO / "tests" / "_faults_worker.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "time/"))} for r in rows]


def _steps(d: Path) -> list[str]:
    return sorted(p.name for p in (d / "checkpoints").glob("step-*"))


# ---- SIGTERM / SIGUSR1 -------------------------------------------------------------------------------


def test_sigterm_during_ppo_checkpoints_exits_75_and_resume_matches(tmp_path):
    """The issue's "done when": `rlhf-fast pipeline --preset ci` (shortened) sent SIGTERM during PPO
    exits within a minute with status 75 and a checkpoint written after the signal; `--resume`
    ends with the metrics of an uninterrupted run."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_fast.cli", *PIPELINE, "--output-dir", str(cut)], cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not [r for r in (read_metrics(cut / "ppo") if (cut / "ppo" / "metrics.jsonl").is_file() else [])
                   if r["step"] >= 1]:  # PPO's first iteration is logged: the second one runs
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
    took, err = time.time() - sent, proc.stderr.read()
    assert rc == 75, err[-3000:]
    ckpt = latest_checkpoint(cut / "ppo")
    assert took < 60 and (ckpt / "manifest.json").stat().st_mtime > sent, (took, ckpt)
    assert 2 <= json.loads((ckpt / "trainer_state.json").read_text())["iteration"] < 4
    last = [ln for ln in err.splitlines() if ln.startswith("rlhf-fast:")][-1]
    assert last.startswith("rlhf-fast: ppo stopped by SIGTERM after its step; the newest checkpoint is ") and \
        last.endswith(f"{ckpt.name}: continue with --resume") and "Traceback" not in err, err[-3000:]
    # the uninterrupted run, and the resumed one: each a fresh process like the interrupted one (in
    # this process, state left by earlier tests, e.g. torch's thread count, moved the SFT model's
    # eval score by 1e-6 in the full suite)
    for args in ((*PIPELINE, "--output-dir", str(ref)), (*PIPELINE, "--output-dir", str(cut), "--resume")):
        done = subprocess.run([sys.executable, "-m", "rlhf_fast.cli", *args], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in read_metrics(cut / "ppo")] == [0, 1, 2, 3, 4]
    assert _comparable(read_metrics(cut / "ppo")) == _comparable(read_metrics(ref / "ppo"))


def _signal_at(monkeypatch, method: str, at: int, sig):
    """Sends this process ``sig`` at the start of the ``at``-th call of ``SFTTrainer.method``."""
    original, calls = getattr(SFTTrainer, method), []

    def wrapped(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), sig)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, method, wrapped)


def test_sigusr1_finishes_the_step_or_stops_at_once_past_the_grace_period(tmp_path, monkeypatch, capsys):
    """SIGUSR1 (SLURM's --signal warning) finishes the step, checkpoints and exits 75; a step still
    running past logging.preempt_grace_s is abandoned (the previous checkpoint stands); the
    handlers the process had are restored."""
    d = tmp_path / "sft"
    run = [*SFT, "--output-dir", str(d), "--sft.max_steps", "5", "--sft.logging.save_every", "0"]
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM)}
    _signal_at(monkeypatch, "train_step", 2, signal.SIGUSR1)
    assert main(run) == 75
    err = capsys.readouterr().err
    assert "rlhf-fast: SIGUSR1: stopping after this step and writing a checkpoint (at once if the step runs past 20 s)" \
        in err and err.strip().splitlines()[-1].endswith("step-000002: continue with --resume"), err
    assert _steps(d) == ["step-000002"] and {s: signal.getsignal(s) for s in before} == before
    monkeypatch.undo()

    def slow_step(self, *a, **k):  # a step that outlives a 0.2 s grace period
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        return original(self, *a, **k)

    original = SFTTrainer.train_step
    monkeypatch.setattr(SFTTrainer, "train_step", slow_step)
    t0 = time.time()
    assert main([*run, "--resume", "--sft.logging.preempt_grace_s", "0.2", "--sft.logging.save_every", "1"]) == 75
    assert time.time() - t0 < 25
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rlhf-fast: sft stopped at once by SIGTERM (the step ran past logging.preempt_grace_s = 0.2")
    assert _steps(d) == ["step-000002", "step-000003"]  # step 3 was saved; step 4 never finished
    monkeypatch.undo()
    assert main([*run, "--resume"]) == 0 and [r["step"] for r in read_metrics(d)] == [1, 2, 3, 4, 5]


def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Rank 1 of a 2-rank torchrun job gets SIGTERM in the middle of step 3; rank 0 gets nothing.
    Both finish step 3 (the flags are all-reduced once per step), write its checkpoint together
    and exit with 75; --resume on 2 ranks completes the run."""
    d = tmp_path / "sft"
    proc = _torchrun("preempt", d, 0, "--sft.logging.save_every", "0")
    assert [(d / f"exit-rank{r}").read_text() for r in (0, 1)] == ["75", "75"], proc.stderr[-4000:]
    assert _steps(d) == ["step-000003"]
    assert f"rlhf-fast: sft stopped by a signal on another rank after its step; the newest checkpoint is " \
           f"{d / 'checkpoints' / 'step-000003'}: continue with --resume" in proc.stderr, proc.stderr[-4000:]
    proc = _torchrun("run", d, 0, "--sft.max_steps", "6", "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["step"] for r in read_metrics(d)] == [1, 2, 3, 4, 5, 6]


# ---- manifests and a full disk --------------------------------------------------------------------------


def test_a_checkpoint_failing_its_manifest_is_skipped_for_the_previous_one(tmp_path, caplog):
    d = tmp_path / "sft"
    assert main([*SFT, "--output-dir", str(d), "--sft.max_steps", "3", "--sft.logging.save_every", "1",
                 "--sft.logging.keep_checkpoints", "0"]) == 0
    ckpts = d / "checkpoints"
    assert _steps(d) == ["step-000001", "step-000002", "step-000003"]
    assert all((ckpts / s / "manifest.json").is_file() for s in _steps(d))
    # a file of the newest one changed after it was written (same size: only the checksum tells)
    victim = sorted((ckpts / "step-000003" / "deepspeed").rglob("*.pt"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (ckpts / "step-000002" / "manifest.json").unlink()  # and the one before it never finished
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(d).name == "step-000001"
    assert f"checkpoint {ckpts / 'step-000003'} is skipped: {victim} does not match its sha256" in caplog.text
    assert f"checkpoint {ckpts / 'step-000002'} is skipped: {ckpts / 'step-000002' / 'manifest.json'} is missing" \
        in caplog.text
    # --resume continues from step 1 and repeats steps 2 and 3 (each skipped checkpoint warned about once)
    caplog.clear()
    cfg = C.load_config(presets=["ci"], overrides=[*SFT[3:], "--sft.max_steps", "3"]).sft
    again = SFTTrainer(cfg, d, resume=True)
    with caplog.at_level(logging.WARNING):
        again.fit()
    assert again.step == 3 and "is skipped" not in caplog.text and [r["step"] for r in read_metrics(d)] == [1, 2, 3]
    assert latest_checkpoint(d).name == "step-000003"  # written again, intact


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    d = tmp_path / "sft"
    run = [*SFT, "--output-dir", str(d), "--sft.max_steps", "4", "--sft.logging.save_every", "2"]
    real_save = torch.save

    def disk_full_on_the_second_checkpoint(obj, f, *a, **k):
        if "step-000004" in str(f):  # the second checkpoint's DeepSpeed state
            with open(f, "wb") as out:
                out.write(b"\0" * 100)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full_on_the_second_checkpoint)
    assert main(run) == 74
    err = capsys.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("rlhf-fast:")][-1]
    assert line.startswith(f"rlhf-fast: error: checkpoint {d / 'checkpoints' / 'step-000004'} could not be written "
                           f"(OSError: [Errno {errno.ENOSPC}] No space left on device"), err
    assert f"the previous checkpoint {d / 'checkpoints' / 'step-000002'} is intact and --resume continues from it" \
        in line and "Traceback" not in err
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["latest", "step-000002"]  # partial removed
    monkeypatch.undo()
    ckpt = latest_checkpoint(d)
    cfg = C.load_config(presets=["ci"], overrides=[*SFT[3:], "--sft.max_steps", "4"]).sft
    trainer = SFTTrainer(cfg, tmp_path / "other")
    trainer.setup_stage()
    assert Checkpointer(d / "checkpoints", keep=2, is_main=True).load(ckpt, trainer.engine)["step"] == 2
    assert main([*run, "--resume"]) == 0 and latest_checkpoint(d).name == "step-000004"


# ---- a dead rank -----------------------------------------------------------------------------------------


def test_a_rank_killed_mid_step_stops_the_other_with_its_name_and_step(tmp_path):
    """Rank 1 of a 2-rank torchrun job is SIGKILLed in the middle of step 3: rank 0 does not hang; it
    stops with one line naming rank 1 and step 2 (the last completed), and exit status 76."""
    d = tmp_path / "sft"
    t0 = time.time()
    proc = _torchrun("kill", d, 0, "--sft.deepspeed.timeout_s", "60")
    took = time.time() - t0
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("rlhf-fast: error:")]
    assert lines == [f"rlhf-fast: error: sft: rank 1 of 2 died or stopped answering during step 3 (the last completed "
                     f"step is 2); rank 0 stops too. The newest checkpoint is {d / 'checkpoints' / 'step-000002'}: "
                     "continue with --resume"], proc.stderr[-4000:]
    assert (d / "exit-rank0").read_text() == "76" and not (d / "exit-rank1").exists()
    assert took < 240, took


def test_only_a_collective_failure_starts_a_roll_call():
    """This rank's own error (an OOM, a bug) is raised as it is: the other ranks, waiting in their
    next collective, would not answer a roll call and would be blamed. A torch.distributed error,
    or any error raised inside torch.distributed (gloo's "Connection reset by peer"), is one."""
    import torch.distributed as dist

    from rlhf_fast.trainers.run.rank_watch import is_collective_failure

    def raised(fn):
        try:
            fn()
        except Exception as e:  # the test inspects it
            return e
        raise AssertionError("nothing raised")

    def own():
        raise RuntimeError("out of memory")

    assert not is_collective_failure(raised(own))
    assert is_collective_failure(raised(lambda: (_ for _ in ()).throw(dist.DistBackendError("NCCL watchdog"))))
    assert is_collective_failure(raised(lambda: dist.all_reduce(torch.zeros(1), group=object())))  # in c10d


# ---- another world size on resume --------------------------------------------------------------------------


@pytest.mark.parametrize("zero, ranks", [(2, (2, 1)), (3, (1, 2))], ids=["zero2-2to1", "zero3-1to2"])
def test_a_checkpoint_resumes_on_another_world_size(tmp_path, zero, ranks):
    """A run stopped after step 2 on one world size and resumed on another ends where an
    uninterrupted 1-rank run ends (SFT's data order and loss do not depend on the world size; the
    Adam moments come through the conversion, or steps 3 and 4 would differ). CI runs ZeRO-2 2 -> 1
    and ZeRO-3 1 -> 2 (both directions, both conversion paths of DeepSpeed's converter; ZeRO-1
    shares ZeRO-2's checkpoint code; ZeRO-0 checkpoints load unconverted)."""
    args = [*SFT, "--sft.max_steps", "4", "--sft.deepspeed.zero_stage", str(zero)]
    one, d = tmp_path / "one", tmp_path / "resumed"

    def run(world: int, *extra):
        if world == 1:
            assert main([*args, "--output-dir", str(d), *extra]) == 0
        else:
            proc = _torchrun("run", d, zero, "--sft.max_steps", "4", *extra)
            assert proc.returncode == 0, proc.stderr[-4000:]

    assert main([*args, "--output-dir", str(one)]) == 0
    run(ranks[0], "--sft.stop_after_steps", "2")
    assert json.loads((latest_checkpoint(d) / "trainer_state.json").read_text())["world_size"] == ranks[0]
    run(ranks[1], "--resume")
    want, got = read_metrics(one), read_metrics(d)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for a, b in zip(want, got):
        assert b["train/tokens"] == a["train/tokens"]  # the same global batches
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5), a["step"]
    assert got[-1]["eval/loss"] == pytest.approx(want[-1]["eval/loss"], rel=1e-5)  # the final model


def test_a_ppo_checkpoint_of_two_ranks_resumes_on_one(tmp_path):
    """PPO (policy and critic engines, ZeRO-2) stopped after iteration 1 of 2 on 2 ranks and
    resumed on 1 repeats the uninterrupted 1-rank run: with greedy rollouts the rows do not depend
    on which rank decodes them, and the update for given rollouts does not depend on the world
    size (tolerance of tests/test_ppo_distributed.py: summation order only)."""
    one, d = tmp_path / "one", tmp_path / "resumed"
    assert main(["ppo", *PPO, "--output-dir", str(one), "--ppo.deepspeed.zero_stage", "2"]) == 0
    proc = _torchrun("ppo", d, 2, "--ppo.stop_after_iterations", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert main(["ppo", *PPO, "--output-dir", str(d), "--ppo.deepspeed.zero_stage", "2", "--resume"]) == 0
    want, got = ([r for r in read_metrics(x) if "objective/kl" in r] for x in (one, d))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    for a, b in zip(want, got):
        for k, v in a.items():
            if not k.startswith(("perf/", "time/", "generation/")):
                assert b[k] == pytest.approx(v, rel=1e-4, abs=1e-5), (a["step"], k)

