"""Runs are never silently lost (issue 16): the output-directory lock, a fresh run that refuses a
directory holding an earlier run unless --overwrite, --resume with nothing to resume, default
periodic checkpoints, Ctrl-C (a checkpoint, one line), pipeline --resume refusing changed finished
stages, and the command line's broken pipe and misspelled options. One process, gloo, CPU; the SFT
runs are a 2-layer, 32-wide model for a few steps."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf_fast import config as C
from rlhf_fast.cli import main
from rlhf_fast.trainers.stage_loop import write_stage_config
from rlhf_fast.trainers.run.metrics_log import read_metrics
from rlhf_fast.trainers.sft import SFTTrainer

REPO = Path(__file__).resolve().parents[1]
SFT = ["--preset", "ci", "--sft.model.size", "test", "--sft.model.config_overrides", "{}", "--sft.batch_size", "16",
       "--sft.micro_batch_size", "8", "--sft.data.max_train_examples", "400", "--sft.data.max_eval_examples", "32",
       "--sft.eval_batch_size", "32", "--sft.logging.progress_bar", "false", "--sft.logging.tensorboard", "false",
       "--sft.logging.log_every", "1"]


def _sft_cfg(*extra):
    return C.load_config(presets=["ci"], overrides=SFT[2:] + list(extra)).sft


def _steps(d: Path) -> list[str]:
    return sorted(p.name for p in (d / "checkpoints").glob("step-*"))


# ---- the lock -----------------------------------------------------------------------------------------

_HOLDER = textwrap.dedent("""
    import sys, time
    from rlhf_fast.trainers.run.guard import OutputDirLock
    OutputDirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def _hold_lock(directory: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_ones(tmp_path, caplog, monkeypatch, capsys):
    """A second run on the directory is refused with the holder's pid, before any model is built;
    a lock left by a killed process is taken over (with a warning); a rank other than 0 never locks."""
    from rlhf_fast.trainers.run import guard

    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(guard.OutputDirBusy, match=rf"is in use by another run \(pid {holder.pid} on "):
            guard.OutputDirLock(tmp_path).acquire()
        monkeypatch.setattr(SFTTrainer, "build_model", lambda self: pytest.fail("model built while locked"))
        assert main(["sft", "--output-dir", str(tmp_path), *SFT]) == 2
        assert f"is in use by another run (pid {holder.pid} on " in capsys.readouterr().err
        # ranks other than 0 do not lock (one lock per run, taken by rank 0)
        trainer = SFTTrainer(_sft_cfg(), tmp_path)
        trainer.dist = runs_dist(rank=1)
        monkeypatch.setattr(SFTTrainer, "_setup", lambda self: (_ for _ in ()).throw(RuntimeError("set up")))
        with pytest.raises(RuntimeError, match="set up"):
            trainer.fit()
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING):
        lock = guard.OutputDirLock(tmp_path).acquire()
    assert f"taking over the lock of pid {holder.pid}" in caplog.text
    assert lock.holder()["pid"] == os.getpid()
    with pytest.raises(guard.OutputDirBusy, match=rf"pid {os.getpid()}"):  # a second run in this process too
        guard.OutputDirLock(tmp_path).acquire()
    lock.release()
    guard.OutputDirLock(tmp_path).acquire().release()


def runs_dist(rank: int):
    import torch

    from rlhf_fast.trainers.deepspeed_setup import DistInfo

    return DistInfo(rank=rank, world_size=1, local_rank=rank, device=torch.device("cpu"))


# ---- fresh / resume / overwrite ---------------------------------------------------------------------------


def test_fresh_run_refuses_a_previous_run_unless_overwrite(tmp_path, caplog):
    """It used to delete the earlier checkpoints, metrics and TensorBoard logs after one warning;
    now nothing is deleted without --overwrite, and the refusal names what is there."""
    d = tmp_path / "sft"
    assert main(["sft", "--output-dir", str(d), *SFT, "--sft.max_steps", "20", "--sft.stop_after_steps", "7"]) == 0
    # default periodic checkpoints: every tenth of the 20-step run (it used to save only where it stopped)
    assert _steps(d) == ["step-000006", "step-000007"]
    before = (d / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"holds a previous sft run \(checkpoints/step-000007 \(\+1 older\), "
                                         r"metrics.jsonl up to step 7\): pass --resume to continue it, --overwrite"):
        SFTTrainer(_sft_cfg("--sft.max_steps", "20"), d).fit()
    assert main(["sft", "--output-dir", str(d), *SFT, "--sft.max_steps", "20"]) == 2  # the CLI: one line
    assert (d / "metrics.jsonl").read_text() == before and _steps(d) == ["step-000006", "step-000007"]
    # --resume and --overwrite together: refused
    with pytest.raises(ValueError, match="exclude each other"):
        SFTTrainer(_sft_cfg("--sft.max_steps", "20"), d, resume=True, overwrite=True).fit()
    # --overwrite: the earlier run is deleted (with a warning) and a new one runs
    with caplog.at_level(logging.WARNING):
        assert main(["sft", "--output-dir", str(d), *SFT, "--sft.max_steps", "3", "--overwrite"]) == 0
    assert "--overwrite: deleted the previous sft run" in caplog.text
    assert [r["step"] for r in read_metrics(d)] == [1, 2, 3] and _steps(d) == ["step-000002", "step-000003"]


def test_resume_with_nothing_to_resume(tmp_path, caplog):
    """--resume on a directory without a run starts one and says so (a job script may always pass
    --resume); on a run that left no complete checkpoint it is refused (starting over would
    replace that run's record), naming what is there."""
    d = tmp_path / "sft"
    with caplog.at_level(logging.WARNING):
        assert main(["sft", "--output-dir", str(d), *SFT, "--sft.max_steps", "2", "--resume"]) == 0
    assert "--resume: nothing to resume in" in caplog.text and "starting a new run" in caplog.text
    (d / "checkpoints" / "latest").write_text("step-000009\n")
    for manifest in (d / "checkpoints").glob("step-*/manifest.json"):  # nothing older to fall back on either
        manifest.unlink()
    d2 = tmp_path / "killed"
    d2.mkdir()
    (d2 / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 3.0}) + "\n")
    from rlhf_fast.trainers.run import guard

    for directory, why in ((d, r".*checkpoints/latest names 'step-000009', and neither it nor an older checkpoint is complete "
                               r"and matches its manifest"),
                           (d2, r"no checkpoint was completed")):
        decision = guard.decide_start(directory, stage="sft", resume=True, overwrite=False)
        assert decision.action == "error"
        with pytest.raises(ValueError, match=rf"--resume: .* holds a previous sft run .*but nothing to resume from "
                                             rf"\({why}\)\. Pass --overwrite"):
            SFTTrainer(_sft_cfg("--sft.max_steps", "2"), directory, resume=True).fit()


# ---- Ctrl-C ----------------------------------------------------------------------------------------------


def _interrupt_at(monkeypatch, cls, method: str, at: int, times: int = 1):
    """Sends this process SIGINT ``times`` times during the ``at``-th call of ``cls.method``."""
    original = getattr(cls, method)
    calls = []

    def wrapped(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, wrapped)


def test_ctrl_c_checkpoints_and_prints_one_line(tmp_path, monkeypatch, capsys):
    """It printed a 107-line traceback and saved nothing. The first Ctrl-C finishes the step, writes
    its checkpoint and stops with exit code 130 and one line saying how to continue; --resume then
    completes the run. A second Ctrl-C stops at once (the last checkpoint stands)."""
    d = tmp_path / "sft"
    run = ["sft", "--output-dir", str(d), *SFT, "--sft.max_steps", "6", "--sft.logging.save_every", "0"]
    _interrupt_at(monkeypatch, SFTTrainer, "train_step", at=3)
    # the handler the process started with (SIG_IGN when a non-interactive shell ran pytest in the
    # background, as a `( cmd & )` CI launch does) is the one the run must leave in place
    before = signal.getsignal(signal.SIGINT)
    assert main(run) == 130
    err = capsys.readouterr().err
    final = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert "Traceback" not in err and final.startswith("rlhf-fast: sft stopped by Ctrl-C; the newest checkpoint is ")
    assert final.endswith("step-000003: continue with --resume")
    assert _steps(d) == ["step-000003"] and signal.getsignal(signal.SIGINT) is before
    monkeypatch.undo()
    _interrupt_at(monkeypatch, SFTTrainer, "train_step", at=2, times=2)  # step 5 of 6: stop at once
    assert main([*run, "--resume"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("rlhf-fast:")]) == 2
    assert "rlhf-fast: sft interrupted (Ctrl-C); the newest checkpoint is" in err
    assert _steps(d) == ["step-000003"]  # nothing written after the second Ctrl-C
    monkeypatch.undo()
    assert main([*run, "--resume"]) == 0
    assert [r["step"] for r in read_metrics(d)] == [1, 2, 3, 4, 5, 6] and (d / "model" / "config.json").is_file()


# ---- pipeline --resume -------------------------------------------------------------------------------------


def _finished_stage(d: Path, stage: str, cfg) -> None:
    (d / "model").mkdir(parents=True)
    (d / "model" / "config.json").write_text("{}")
    write_stage_config(d, stage, cfg)


def test_pipeline_resume_refuses_changed_settings_of_finished_stages(tmp_path, monkeypatch):
    """A finished stage was skipped silently with the old settings (its config.yaml kept the old
    value); now the pipeline refuses before anything trains, as a stage's own --resume does."""
    from rlhf_fast.trainers import pipeline
    from rlhf_fast.trainers.ppo import PPOTrainer
    from rlhf_fast.trainers.rm import RMTrainer

    for cls in (SFTTrainer, RMTrainer, PPOTrainer):
        monkeypatch.setattr(cls, "fit", lambda self: pytest.fail(f"{type(self).__name__} ran"))
    monkeypatch.chdir(tmp_path)
    out = Path("run")  # relative: the second run names the same directory absolutely
    cfg = C.load_config(presets=["ci"])
    # the stages' configs as the pipeline writes them: its model paths filled in from DIR
    cfg.rm.sft_model, cfg.ppo.policy.path = str(out / "sft" / "model"), str(out / "sft" / "model")
    cfg.ppo.reward.model_path = str(out / "rm" / "model")
    _finished_stage(out / "sft", "sft", cfg.sft)
    _finished_stage(out / "rm", "rm", cfg.rm)
    changed = C.load_config(presets=["ci"], overrides=["--rm.margin", "0.5", "--sft.logging.log_every", "3"])
    with pytest.raises(ValueError, match=r"pipeline --resume: the rm stage in .*rm ran with other settings: .*"
                                         r"rm\.margin: 0\.0 in the checkpoint, 0\.5 now"):
        pipeline.run_pipeline(changed, out, resume=True, echo=lambda *a: None)
    # the same settings written another way (an absolute --output-dir) and a logging change pass the check
    same = C.load_config(presets=["ci"], overrides=["--sft.logging.log_every", "3"])
    with pytest.raises(pytest.fail.Exception, match="PPOTrainer ran"):
        pipeline.run_pipeline(same, tmp_path / "run", resume=True, echo=lambda *a: None)
    # a fresh pipeline on it is refused, naming the stages' runs
    with pytest.raises(ValueError, match=r"holds a previous pipeline run \(sft: model/; rm: model/\): pass --resume"):
        pipeline.run_pipeline(C.load_config(presets=["ci"]), out, echo=lambda *a: None)


def test_summary_shows_the_missing_stop_share(tmp_path):
    """A -1 missing-stop penalty on 75 % of rollouts showed as a bare "score -1.0"."""
    from rlhf_fast.trainers.pipeline import format_summary, summarize

    (tmp_path / "ppo").mkdir()
    rows = [{"step": 0, "eval/score": 0.2, "eval/gold_score": 0.1, "eval/kl": 0.0, "eval/missing_stop_frac": 0.75},
            {"step": 1, "objective/kl": 0.5, "objective/scores": -0.7, "objective/raw_scores": 0.2,
             "objective/missing_stop_frac": 0.75},
            {"step": 1, "eval/score": 0.3, "eval/gold_score": 0.4, "eval/kl": 0.5, "eval/missing_stop_frac": 0.5}]
    (tmp_path / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = summarize(tmp_path, seconds=1.0, stage_seconds={}, planned_iterations=1)
    assert (s["sft_missing_stop_frac"], s["ppo_missing_stop_frac"], s["final_train_missing_stop_frac"]) == (0.75, 0.5, 0.75)
    text = format_summary(s)
    assert any(ln.split()[-2:] == ["75%", "50%"] for ln in text.splitlines() if "without a stop token" in ln), text
    assert ("last PPO iteration: training score -0.700 (reward alone 0.200; 75% of the rollouts had no stop token "
            "and got generation.missing_stop_penalty)") in text


# ---- the command line -----------------------------------------------------------------------------------


def test_underscore_spelling_of_an_option_is_pointed_to_the_dashed_one(capsys):
    for argv in (["sft", "--output_dir", "x"], ["pipeline", "--output_dir=x"], ["rm", "--resume", "--output_dir", "x"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "unrecognized option --output_dir: did you mean --output-dir?" in err, err
    # config fields keep their underscores
    assert main(["config", "--sft.max_steps", "3"]) == 0 and "max_steps: 3" in capsys.readouterr().out


def test_new_fields_are_documented(capsys):
    assert main(["config", "--docs"]) == 0
    out = capsys.readouterr().out
    assert "sft.logging.save_every = None\n    Optimizer steps between checkpoints" in out
    assert "ppo.logging.save_every = None\n    Iterations between checkpoints" in out
    assert "ppo.logging.samples_per_iteration = 4\n    Rollouts (prompt, response, score)" in out
    with pytest.raises(ValueError, match=r"ppo\.logging\.save_every: expected an integer >= 0"):
        C.load_config(overrides=["--ppo.logging.save_every", "-1"])


def test_config_docs_into_a_closed_pipe_ends_quietly():
    r = subprocess.run(f"{sys.executable} -m rlhf_fast.cli config --docs | head -n 2", shell=True, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert len(r.stdout.splitlines()) == 2
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr


def test_rm_command_reuses_its_sft_model_only_with_the_same_settings(tmp_path, capsys):
    """`rlhf-fast rm` without rm.sft_model trains DIR/sft and reuses it on the next call; reused
    silently under changed sft settings before."""
    d = tmp_path / "rm"
    assert main(["sft", "--output-dir", str(d / "sft"), *SFT, "--sft.max_steps", "2"]) == 0
    capsys.readouterr()
    assert main(["rm", "--output-dir", str(d), *SFT, "--sft.max_steps", "2", "--sft.optim.lr", "1e-5",
                 "--rm.max_steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "(the SFT model this command trains and reuses) was made with other settings" in err
    assert "sft.optim.lr: 0.002 in the checkpoint, 1e-05 now" in err and not (d / "metrics.jsonl").exists()
