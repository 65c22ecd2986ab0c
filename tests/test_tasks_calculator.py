"""The ``tiny_calculator`` task and its environment (``tasks/calculator.py``, ``envs/calculator.py``):
the calculator and the checker are exact, the SFT transcripts are correct tool use (replayed through
the environment, every reply and the final reward agree), RL / held-out problems have 2-3 steps
(SFT: 1-3) and are disjoint from the SFT ones and each other, the markers are single tokens, the ``--task`` preset
wires ``ppo.env``, bad settings are named, and a tiny PPO run on episodes keeps the exactness
promises and logs its turns."""

from __future__ import annotations

import json

import pytest

from rlhf_fast import config as C
from rlhf_fast.envs import Turn
from rlhf_fast.envs import calculator as ce
from rlhf_fast.tasks import get_task
from rlhf_fast.tasks import calculator as tc


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return get_task("tiny_calculator", cache_dir=tmp_path_factory.mktemp("cache"), num_sft=300,
                    num_train_prompts=200, num_eval_prompts=100)


def _turn(text, i=0, stopped=True):
    return Turn(ids=(), text=text, index=i, stopped=stopped)


def test_calculator_and_checker_are_exact():
    assert ce.solve("17, add 12, times 3, minus 9?") == 78
    assert ce.calculate("17+12") == "29" and ce.calculate("29*3") == "87" and ce.calculate(" 5 - 9 ") == "-4"
    for bad in ("1+2+3", "2**8", "import os", "", "1/2"):
        assert ce.calculate(bad) == "?", bad
    env = ce.CalculatorEnv()
    assert env.reset("17, add 12, times 3?") is None
    assert env.step(_turn("<calc>17+12</calc>")) == ce.StepResult("29", 0.0, False)
    assert env.step(_turn("so <calc>29*3</calc>", 1)) == ce.StepResult("87", 0.0, False)
    assert env.step(_turn("=87<|endoftext|>", 2)) == ce.StepResult(None, 1.0, True)
    env.reset("17, add 12, times 3?")
    assert env.step(_turn("=88<|endoftext|>")).reward == 0.0
    env.reset("17, add 12, times 3?")
    assert env.step(_turn("<calc>17+12", stopped=False)) == ce.StepResult(None, 0.0, True)  # cut: no answer
    with pytest.raises(ValueError, match="not a tiny_calculator problem"):
        env.reset("17+12=")
    with pytest.raises(ValueError, match="step before reset"):
        ce.CalculatorEnv().step(_turn("=1"))


def _replay(prompt: str, transcript: str) -> float:
    """Plays an SFT transcript through the environment turn by turn; the replies must be the ones
    written in the transcript. Returns the final reward."""
    env = ce.CalculatorEnv()
    env.reset(prompt)
    rest = transcript
    while ce.CALL_CLOSE in rest:
        turn, rest = rest.split(ce.CALL_CLOSE, 1)
        res = env.step(_turn(turn + ce.CALL_CLOSE))
        assert not res.done and rest.startswith(res.observation), (prompt, transcript)
        rest = rest[len(res.observation):]
    res = env.step(_turn(rest + ce.EOS_TEXT))
    assert res.done
    return res.reward


def test_sft_transcripts_are_correct_tool_use(task):
    sft = task.sft_records()
    assert len(sft) == 300
    assert all(_replay(r["prompt"], r["response"]) == 1.0 for r in sft)  # no injected errors
    assert all(r["response"].count(ce.CALL_OPEN) == len(ce.problem_steps(r["prompt"])[1]) for r in sft)
    assert task.gold_reward([r["response"] for r in sft[:20]], [r["prompt"] for r in sft[:20]]) == [1.0] * 20
    assert task.gold_reward(["=0"], [sft[0]["prompt"]]) == [0.0]


def test_rl_and_held_out_problems_are_longer_and_disjoint(task):
    steps = lambda recs: [len(ce.problem_steps(r["prompt"])[1]) for r in recs]  # noqa: E731
    sft, train, evals = task.sft_records(), task.prompt_records("train"), task.prompt_records("eval")
    assert set(steps(sft)) == {1, 2, 3} and set(steps(train)) == {2, 3} and set(steps(evals)) == {2, 3}
    held = {r["prompt"] for r in evals}
    assert len(held) == 100 and not held & {r["prompt"] for r in sft} and not held & {r["prompt"] for r in train}
    with pytest.raises(ValueError, match="split"):
        task.prompt_records("test")
    with pytest.raises(ValueError, match="rl_steps"):
        tc.CalculatorTaskConfig(rl_steps=(3, 2))


def test_markers_are_single_tokens(task):
    tok = task.tokenizer
    r = task.sft_records()[0]
    ids = tok.encode(r["prompt"] + r["response"], add_special_tokens=False)
    close = tok.convert_tokens_to_ids(ce.CALL_CLOSE)
    assert close in ids and tok.convert_tokens_to_ids(ce.CALL_OPEN) in ids
    assert tok.decode(ids) == r["prompt"] + r["response"]
    assert tok.decode(ids, skip_special_tokens=True) == r["prompt"] + r["response"]  # the markers stay visible


def test_preset_and_bad_settings_are_named():
    cfg = C.load_config(presets=["tiny_calculator"]).ppo
    assert cfg.env == "tiny_calculator" and cfg.reward.function is None and cfg.generation.stop_tokens == ["</calc>"]
    C.load_config(presets=["tiny_calculator", "grpo"])
    for extra, msg in [(["--ppo.reward.function", "task:gold"], "leave ppo.reward.model_path and ppo.reward.function"),
                       (["--ppo.generation.backend", "hf_generate", "--ppo.old_logprobs", "recompute"],
                        "runs episodes"),
                       (["--ppo.env", "nope"], "not a registered environment"),
                       (["--ppo.env_max_turns", "0"], "env_max_turns must be an int >= 1"),
                       (["--ppo.generation.min_new_tokens", "2"], "min_new_tokens must be 0")]:
        with pytest.raises(ValueError, match=msg):
            C.load_config(presets=["tiny_calculator"], overrides=extra)


class ReplyEnv:
    """Answers every turn with the text "=7" and reward 0.25; done after 3 turns (a random tiny
    policy seldom writes "</calc>", so this one replies to any turn)."""

    def __init__(self):
        self.n = 0

    def reset(self, prompt):
        self.n = 0

    def step(self, turn):
        self.n += 1
        return ("=7", 0.25, self.n >= 3)


@pytest.mark.parametrize("env", ["tiny_calculator", "test_tasks_calculator:ReplyEnv"])
def test_ppo_on_episodes(tmp_path, env):
    """Three PPO iterations of a random tiny policy on episodes (the calculator's, and a user
    environment's named as module:Class, with 36 characters ending a turn so that turns are short):
    the engine-vs-trainer gap is float32 rounding, the first minibatch's ratio exactly 1, the sample
    log marks the turns."""
    from rlhf_fast.trainers.ppo import PPOTrainer
    from rlhf_fast.trainers.run.metrics_log import read_metrics

    cfg = C.load_config(presets=["tiny_calculator"], overrides=[
        "--ppo.logging.progress_bar", "false", "--ppo.logging.tensorboard", "false", "--ppo.policy.size", "test",
        "--ppo.iterations", "3", "--ppo.rollout_batch_size", "8", "--ppo.generation.max_new_tokens", "24",
        "--ppo.eval_prompts", "8", "--ppo.logging.eval_every", "0", "--ppo.algo.num_minibatches", "2",
        "--ppo.critic", "value_head", "--ppo.optim.lr", "1e-3", "--ppo.generation.temperature", "1.0",
        "--ppo.algo.temperature", "1.0", "--ppo.env", env,
        "--ppo.generation.stop_tokens", json.dumps(["</calc>", *"abcdefghijklmnopqrstuvwxyz0123456789"])]).ppo
    PPOTrainer(cfg, tmp_path).fit()
    rows = [r for r in read_metrics(tmp_path) if "objective/kl" in r]
    assert len(rows) == 3
    for r in rows:
        assert r["generation/logprob_gap_max"] <= 1e-5
        assert r["policy/first_minibatch_approxkl"] == 0.0 and r["policy/first_minibatch_clipfrac"] == 0.0
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["turns"] and s["turns"][0]["role"] == "model" for s in samples)
    replies = [t["text"] for s in samples for t in s["turns"] if t["role"] == "env"]
    if env.endswith("ReplyEnv"):  # the calculator answers only "</calc>" turns, which a random policy seldom ends
        assert replies and set(replies) <= {"=7"}
    assert all(s["response"].startswith("[model] ") for s in samples)


def test_pipeline_wiring(tmp_path, capsys):
    """`rlhf-fast pipeline --task tiny_calculator`, shortened: SFT -> PPO on episodes scored by the
    environment, no reward-model stage, exact-match accuracy in the summary (the full run's figures
    are in the README; this checks the wiring)."""
    from rlhf_fast.cli import main

    out = tmp_path / "run"
    rc = main(["pipeline", "--task", "tiny_calculator", "--output-dir", str(out), "--sft.max_steps", "20",
               "--ppo.iterations", "2", "--ppo.rollout_batch_size", "4", "--ppo.eval_prompts", "16",
               "--ppo.logging.eval_every", "2", "--sft.logging.progress_bar", "false",
               "--ppo.logging.progress_bar", "false"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    printed = capsys.readouterr().out
    assert "scored by the environment tiny_calculator" in printed
    assert summary["gold_metric"] == "exact-match accuracy" and summary["reward"] == "env:tiny_calculator"
    assert 0.0 <= summary["sft_gold_score"] <= 1.0 and 0.0 <= summary["ppo_gold_score"] <= 1.0
    assert summary["ppo_iterations"] == 2 and not (out / "rm").exists()
