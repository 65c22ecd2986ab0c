"""The main job, shortened for CI: `rlhf-fast pipeline --preset ci` on the built-in task (SFT ->
reward model -> PPO) through the command line. PPO must beat the SFT policy's gold score (the
task's hidden reward, which PPO never sees) by a clear margin with KL under control, and the run
must leave summary.json, plots, metrics and models behind.

Measured on a 2-core CPU: about 30 s, gold score 0.19 -> 2.3, KL ~9 nats / sequence (the full
default pipeline: 4.3 min, 0.00 -> 3.07, KL 9.6)."""

from __future__ import annotations

import json

import pytest

from rlhf_fast.cli import main


@pytest.mark.slow
def test_pipeline_ci_preset_improves_gold_score(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["pipeline", "--preset", "ci", "--output-dir", str(out), "--sft.logging.progress_bar", "false",
               "--rm.logging.progress_bar", "false", "--ppo.logging.progress_bar", "false"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    printed = capsys.readouterr().out
    assert "gold score (held-out prompts)" in printed
    for key in ("sft_gold_score", "ppo_gold_score", "final_kl", "seconds"):
        assert summary[key] is not None, key
    assert summary["ppo_gold_score"] > summary["sft_gold_score"] + 1.0, summary
    assert 0.0 < summary["final_kl"] < 25.0, summary  # moved, and held by the KL penalty
    assert summary["rm_eval_accuracy"] >= 0.75, summary
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "metrics.jsonl").is_file() and (out / stage / "model" / "config.json").is_file()
    assert (out / "ppo" / "plots" / "ppo_summary.png").is_file()
    assert "STOPPED EARLY" not in printed and summary["ppo_iterations"] == summary["ppo_iterations_planned"]


def test_summary_says_when_ppo_stopped_early():
    """A stop_after_iterations run printed its iteration-0 evaluation as the PPO result."""
    from rlhf_fast.trainers.pipeline import format_summary

    s = {"sft_gold_score": -1.3, "ppo_gold_score": -1.3, "sft_rm_score": 0.1, "ppo_rm_score": 0.1, "final_kl": 0.0,
         "rm_eval_accuracy": 0.8, "ppo_iterations": 2, "ppo_iterations_planned": 30, "ppo_eval_iteration": 0,
         "seconds": 10.0, "stage_seconds": {}}
    assert "STOPPED EARLY after 2 of 30 PPO iterations: the PPO column is the evaluation at iteration 0" \
        in format_summary(s)
    assert "STOPPED EARLY" not in format_summary({**s, "ppo_iterations": 30})


@pytest.mark.slow
def test_pipeline_ci_preset_with_lora_in_every_stage(tmp_path):
    """``--sft.lora.rank 8 --rm.lora.rank 8 --ppo.lora.rank 8`` (docs/architecture.md "LoRA"): every
    stage trains adapters, each stage loads the previous one's adapter directory merged, and PPO
    still beats the SFT policy's gold score. LoRA on the task's randomly initialised model learns
    far less than full fine-tuning (frozen random embeddings), hence no margin here: measured on a
    2-core CPU, about 60 s, gold -7.12 -> -6.37, RM accuracy 0.62, KL 0.85."""
    out = tmp_path / "run"
    rc = main(["pipeline", "--preset", "ci", "--output-dir", str(out), "--sft.lora.rank", "8", "--rm.lora.rank", "8",
               "--ppo.lora.rank", "8", "--sft.logging.progress_bar", "false", "--rm.logging.progress_bar", "false",
               "--ppo.logging.progress_bar", "false"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ppo_gold_score"] > summary["sft_gold_score"], summary
    assert 0.0 < summary["final_kl"] < 25.0, summary
    for stage in ("sft", "rm", "ppo"):
        model = out / stage / "model"
        assert (model / "adapter_config.json").is_file() and (model / "base" / "config.json").is_file(), stage

def test_pipeline_verifiable_task_skips_the_reward_model(tmp_path, capsys):
    """`rlhf-fast pipeline --task tiny_arithmetic --preset grpo`, shortened: SFT -> GRPO scored by the
    task's checker, no reward-model stage, exact-match accuracy in the summary. (The figures of the
    full run are in the README; this checks the wiring.)"""
    out = tmp_path / "run"
    rc = main(["pipeline", "--task", "tiny_arithmetic", "--preset", "grpo", "--output-dir", str(out),
               "--sft.max_steps", "40", "--ppo.iterations", "2", "--ppo.rollout_batch_size", "8",
               "--ppo.eval_prompts", "32", "--ppo.logging.eval_every", "2", "--sft.logging.progress_bar", "false",
               "--ppo.logging.progress_bar", "false"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    printed = capsys.readouterr().out
    assert "exact-match accuracy (held-out prompts)" in printed and "no reward model" in printed
    assert summary["gold_metric"] == "exact-match accuracy" and summary["reward"] == "task:gold"
    assert 0.0 <= summary["sft_gold_score"] <= 1.0 and 0.0 <= summary["ppo_gold_score"] <= 1.0
    assert summary["ppo_iterations"] == 2 and not (out / "rm").exists()
    assert (out / "ppo" / "plots" / "ppo_summary.png").is_file()
