"""The PPO trainer end to end on the built-in task (one process, gloo, CPU), with the task's gold
reward as a reward function so no reward model has to be trained first: metrics with the TRL /
N-details names, KL exactly 0 on the first rollout (reference == policy), the engine / trainer
log-prob gap near 0, a stopped-and-resumed run that repeats the uninterrupted one, checkpoints,
plots, the final model, and clear errors for bad reward functions."""

from __future__ import annotations

import math

import pytest

from rlhf_fast import config as C
from rlhf_fast.trainers.deepspeed_setup import lr_factor
from rlhf_fast.trainers.ppo import PPOTrainer, call_reward_function
from rlhf_fast.trainers.run.metrics_log import read_metrics

QUIET = ["--ppo.logging.progress_bar", "false", "--ppo.logging.tensorboard", "false"]
TINY = ["--ppo.policy.size", "test", "--ppo.reward.function", "task:gold", "--ppo.iterations", "4",
        "--ppo.rollout_batch_size", "8", "--ppo.generation.max_new_tokens", "8", "--ppo.eval_prompts", "8",
        "--ppo.logging.eval_every", "2", "--ppo.algo.num_minibatches", "2", "--ppo.algo.num_epochs", "2",
        "--ppo.critic", "value_head", "--ppo.optim.lr", "1e-3"]


def _cfg(*extra):
    return C.load_config(overrides=[*QUIET, *TINY, *extra]).ppo


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("perf/", "time/"))} for r in rows]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo")
    last = PPOTrainer(_cfg(), out).fit()
    return out, last


def test_metrics_names_and_sanity(run):
    out, last = run
    rows = read_metrics(out)
    train = [r for r in rows if "objective/kl" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for name in ("objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward", "policy/approxkl",
                 "policy/clipfrac", "policy/entropy", "val/clipfrac", "val/vpred", "val/error", "policy/ratio_mean",
                 "policy/ratio_max", "kl_coef", "objective/response_length", "time/generate_s", "time/score_s",
                 "time/logprobs_s", "time/advantages_s", "time/train_s", "perf/tokens_per_s",
                 "generation/logprob_gap_max"):
        assert name in train[0], name
        assert all(math.isfinite(r[name]) for r in train), name
    assert train[0]["objective/kl"] == 0.0  # the first rollout's policy is the reference
    assert train[0]["generation/logprob_gap_max"] < 1e-4  # engine vs trainer log-probs: same weights, same code
    evals = [r for r in rows if "eval/gold_score" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]  # the SFT policy first, then every eval_every
    # train/lr is the lr the iteration trained with (it was logged after the iteration's scheduler steps)
    cfg = _cfg()
    per_iter = PPOTrainer(cfg, out / "unused").total_steps // cfg.iterations
    want = [cfg.optim.lr * lr_factor(i * per_iter, total_steps=per_iter * cfg.iterations,
                                     warmup_steps=cfg.scheduler.warmup_steps, decay=cfg.scheduler.decay,
                                     min_ratio=cfg.scheduler.min_lr_ratio) for i in range(cfg.iterations)]
    assert [r["train/lr"] for r in train] == pytest.approx(want, rel=1e-6)


def test_outputs_written(run):
    out, _ = run
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    # periodic checkpoints by default: every tenth of the run's iterations (here each), the newest two kept
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000003", "step-000004"]
    assert (out / "plots" / "ppo_summary.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file()


def test_resume_repeats_the_uninterrupted_run(run, tmp_path):
    out, _ = run
    PPOTrainer(_cfg("--ppo.stop_after_iterations", "2"), tmp_path).fit()
    assert len([r for r in read_metrics(tmp_path) if "objective/kl" in r]) == 2
    with pytest.raises(ValueError, match=r"ppo\.algo\.kl_init: .* in the checkpoint, 0\.5 now"):
        PPOTrainer(_cfg("--ppo.algo.kl_init", "0.5"), tmp_path, resume=True).fit()
    PPOTrainer(_cfg(), tmp_path, resume=True).fit()
    assert _comparable(read_metrics(tmp_path)) == _comparable(read_metrics(out))


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda p, r: [float("nan")] * len(p), r"prompt index 0"),
        (lambda p, r: [0.0] * (len(p) - 1), r"one score per prompt"),
        (lambda p, r: [0.0, float("inf")] + [0.0] * (len(p) - 2), r"inf for prompt index 1"),
        (lambda p, r: "bad", r"not a sequence of numbers"),
    ],
)
def test_bad_reward_function_errors(fn, match):
    with pytest.raises(ValueError, match=match):
        call_reward_function(fn, ["a", "b", "c"], ["x", "y", "z"])


def test_reward_function_exception_names_the_batch():
    def boom(prompts, responses):
        raise KeyError("label")

    with pytest.raises(RuntimeError, match=r"raised KeyError: 'label' \(on 3 responses, prompt indices 4..6; the first: 'a'\)"):
        call_reward_function(boom, ["a", "b", "c"], ["x", "y", "z"], index_offset=4)
    with pytest.raises(ValueError, match=r"inf for eval prompt index 9"):
        call_reward_function(lambda p, r: [0.0, float("inf")], ["a", "b"], ["x", "y"], indices=[7, 9], what="eval prompt")


def test_reward_function_module_from_the_current_directory(tmp_path, monkeypatch):
    """The console script does not put the current directory on sys.path (python -m does)."""
    import sys

    from rlhf_fast.trainers.ppo import load_reward_function

    (tmp_path / "qa_rewards_cwd.py").write_text("def ok(prompts, responses):\n    return [1.0] * len(prompts)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert load_reward_function("qa_rewards_cwd:ok")(["a"], ["b"]) == [1.0]
    with pytest.raises(ValueError, match=r"cannot be loaded: No module named 'no_such_rewards_mod'.*PYTHONPATH"):
        load_reward_function("no_such_rewards_mod:fn")


def test_stop_tokens_resolved_or_named():
    from rlhf_fast.tasks import get_task
    from rlhf_fast.trainers.ppo import resolve_stop_tokens

    tok = get_task("tiny_sentiment").tokenizer
    # "." and its word-initial form "Ġ." (the built-in task's periods: "a baby ."): both stop
    assert resolve_stop_tokens(tok, ["."]) == [tok.convert_tokens_to_ids("."), tok.convert_tokens_to_ids("Ġ.")]
    assert tok(" a baby .", add_special_tokens=False)["input_ids"][-1] == tok.convert_tokens_to_ids("Ġ.")
    with pytest.raises(ValueError, match=r"stop_tokens: 'NOSUCHTOKEN' is not a token of the tokenizer"):
        resolve_stop_tokens(tok, ["NOSUCHTOKEN"])


def test_bad_reward_function_in_trainer_names_prompt(tmp_path):
    def nan_at_3(prompts, responses):
        return [float("nan") if i == 3 else 0.0 for i in range(len(prompts))]

    with pytest.raises(ValueError, match=r"prompt index 3"):
        PPOTrainer(_cfg("--ppo.iterations", "1"), tmp_path, reward_fn=nan_at_3).fit()
    assert not (tmp_path / "model").exists()  # nothing half-written


def test_data_errors_before_any_model(tmp_path, monkeypatch):
    """Too few prompts (naming the held-out eval prompts) and an empty prompt file are reported
    before a model is built."""
    import json

    from rlhf_fast.trainers import ppo_parts

    monkeypatch.setattr(ppo_parts, "_models", lambda *a, **k: pytest.fail("models built before the data check"))
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(12)))
    cfg = _cfg("--ppo.data.train_file", str(f), "--ppo.eval_prompts", "8", "--ppo.rollout_batch_size", "8",
               "--ppo.reward.function", "task:gold")
    with pytest.raises(ValueError, match=r"4 training prompts < ppo.rollout_batch_size \(8\); 8 others were held "
                                         r"out for evaluation \(ppo.eval_prompts 8\)"):
        PPOTrainer(cfg, tmp_path / "a").fit()
    f.write_text("")
    with pytest.raises(ValueError, match=r"ppo\.data\.train_file '.*prompts\.jsonl' holds no records"):
        PPOTrainer(cfg, tmp_path / "b").fit()


def test_bad_config_values():
    with pytest.raises(ValueError, match=r"ppo.algo.*lam"):
        C.load_config(overrides=["--ppo.algo.lam", "1.5"])
    with pytest.raises(ValueError, match=r"ppo.critic"):
        C.load_config(overrides=["--ppo.critic", "both"])
    with pytest.raises(ValueError, match=r"advantage estimator"):
        C.load_config(overrides=["--ppo.algo.advantage_estimator", "vtrace"])
    with pytest.raises(ValueError, match=r"frozen_zero3 and ppo.ref_on_cpu exclude each other"):
        C.load_config(overrides=["--ppo.frozen_zero3", "true", "--ppo.ref_on_cpu", "true"])
    with pytest.raises(ValueError, match=r"ppo.generation.decode"):
        C.load_config(overrides=["--ppo.generation.decode", "graphs"])


def test_running_score_normalisation_resumes_exactly(tmp_path):
    """PPO-max's running score statistics are trainer state: a resumed run must restore them."""
    extra = ["--ppo.algo.normalize_scores", "true", "--ppo.iterations", "3", "--ppo.logging.eval_every", "0"]
    full, part = tmp_path / "full", tmp_path / "part"
    PPOTrainer(_cfg(*extra), full).fit()
    PPOTrainer(_cfg(*extra, "--ppo.stop_after_iterations", "1"), part).fit()
    PPOTrainer(_cfg(*extra), part, resume=True).fit()
    rows = [r for r in read_metrics(full) if "objective/scores" in r]
    assert abs(rows[0]["objective/scores"]) < 1e-5  # the first batch normalises to mean 0
    assert _comparable(read_metrics(part)) == _comparable(read_metrics(full))


def test_static_decode_path_repeats_the_eager_run(run, tmp_path):
    """``generation.decode`` reaches the engine; the static path samples the same tokens for the same
    seed (counter-based noise), so a whole run repeats the eager run's metrics."""
    out, _ = run
    PPOTrainer(_cfg("--ppo.generation.decode", "static"), tmp_path).fit()
    eager, static = read_metrics(out), read_metrics(tmp_path)
    assert len(eager) == len(static)
    for a, b in zip(_comparable(eager), _comparable(static)):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k


def test_what_users_watch_and_ctrl_c(tmp_path, monkeypatch):
    """Issue 16: a -1 missing-stop penalty on most rollouts showed as a bare "score -1.0" and no
    response was ever shown. The bar now shows the share without a stop token and the reward's own
    score; DIR/samples.jsonl and TensorBoard get a few rollouts per iteration (their rows after a
    resumed iteration are dropped); Ctrl-C stops after the iteration with its checkpoint."""
    import json
    import os
    import signal

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhf_fast.trainers import stage_loop as loop_mod  # PPO runs the shared StageTrainer loop
    from rlhf_fast.trainers.run.guard import Interrupted

    postfixes = []

    class Bar:
        def update(self, n):
            pass

        def set_postfix(self, d=None, **kw):
            postfixes.append(dict(d or {}, **kw))

        def close(self):
            pass

    monkeypatch.setattr(loop_mod, "make_progress", lambda *a, **k: Bar())
    original, calls = PPOTrainer.run_step, []

    def interrupted_in_the_second(self):
        calls.append(self.step)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(PPOTrainer, "run_step", interrupted_in_the_second)
    # an untrained policy almost never emits EOS: most rollouts get the -1 of missing_stop_penalty "replace"
    extra = ["--ppo.iterations", "3", "--ppo.logging.eval_every", "0", "--ppo.logging.tensorboard", "true",
             "--ppo.logging.samples_per_iteration", "3"]
    with pytest.raises(Interrupted, match=r"ppo stopped by Ctrl-C; the newest checkpoint is .*step-000002: continue "
                                          r"with --resume"):
        PPOTrainer(_cfg(*extra), tmp_path).fit()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000002"
    rows = [r for r in read_metrics(tmp_path) if "objective/scores" in r]
    assert [len(postfixes), len(rows)] == [2, 2]
    for bar, row in zip(postfixes, rows):
        assert bar["no_stop"] == f"{row['objective/missing_stop_frac']:.0%}" and bar["raw"] == f"{row['objective/raw_scores']:.3f}"
        assert bar["score"] == f"{row['objective/scores']:.3f}"
    assert rows[0]["objective/missing_stop_frac"] > 0.5
    samples = [json.loads(ln) for ln in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in samples] == [1, 1, 1, 2, 2, 2]
    for r in samples:
        assert r.keys() == {"iteration", "prompt", "response", "score", "raw_score", "stopped"}
        assert r["prompt"] and isinstance(r["response"], str)
        assert r["score"] == (r["raw_score"] if r["stopped"] else -1.0)
    # a run killed after writing iteration 3's samples but before its checkpoint: resume drops them
    with (tmp_path / "samples.jsonl").open("a") as f:
        f.write(json.dumps({**samples[0], "iteration": 3}) + "\n")
    monkeypatch.setattr(PPOTrainer, "run_step", original)
    PPOTrainer(_cfg(*extra), tmp_path, resume=True).fit()
    samples = [json.loads(ln) for ln in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in samples] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    text = [t for t in events.Tags()["tensors"] if t.startswith("samples")]
    assert text and [e.step for e in events.Tensors(text[0])] == [1, 2, 3]
