"""The ``tiny_arithmetic`` task (``rlhf_fast/tasks/arithmetic.py``): the exact checker, the
held-out split, the character-level tokenizer, and the ``--task`` / preset wiring that makes a
verifiable reward run without a reward model."""

from __future__ import annotations

import pytest

from rlhf_fast.cli import parse
from rlhf_fast.tasks import ArithmeticTaskConfig, get_task
from rlhf_fast.tasks import arithmetic as ar


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return get_task("tiny_arithmetic", cache_dir=tmp_path_factory.mktemp("cache"), num_sft=500,
                    num_train_prompts=200, num_eval_prompts=100)


def test_checker_is_exact():
    assert ar.answer("37+58=") == 95 and ar.answer("7-9=") == -2
    assert ar.gold_score("37+58=", "95") == 1.0 and ar.gold_score("37+58=", " 95 ") == 1.0
    for wrong in ("96", "095", "95.", "9 5", "", "95 and more"):
        assert ar.gold_score("37+58=", wrong) == 0.0, wrong
    with pytest.raises(ValueError, match="tiny_arithmetic prompt"):
        ar.answer("hello")
    with pytest.raises(ValueError, match="prompts"):
        ar.gold_reward(["1"])
    with pytest.raises(ValueError, match="2 prompts for 1 responses"):
        ar.gold_reward(["1"], ["0+1=", "1+1="])


def test_records_and_held_out_split(task):
    sft, train, evals = task.sft_records(), task.prompt_records("train"), task.prompt_records("eval")
    assert len(sft) == 500 and len(train) == 200 and len(evals) == 100
    wrong = [r for r in sft if r["response"] != str(ar.answer(r["prompt"]))]
    assert all(abs(int(r["response"]) - ar.answer(r["prompt"])) == 1 for r in wrong)  # slips are off by one
    assert 0.2 < len(wrong) / len(sft) < 0.4  # sft_noise 0.3
    clean = get_task("tiny_arithmetic", cache_dir=task.cache_dir, num_sft=200, sft_noise=0.0).sft_records()
    assert all(r["response"] == str(ar.answer(r["prompt"])) for r in clean)
    held = {r["prompt"] for r in evals}
    assert not held & {r["prompt"] for r in sft} and not held & {r["prompt"] for r in train}
    assert task.sft_records() == sft  # deterministic
    assert get_task("tiny_arithmetic", cache_dir=task.cache_dir, seed=1, num_sft=500).sft_records() != sft
    with pytest.raises(ValueError, match="split"):
        task.prompt_records("test")
    with pytest.raises(ValueError, match="verifiable"):
        task.preference_records()


def test_tokenizer_one_token_per_character(task):
    tok = task.tokenizer
    assert tok.tokenize("137+58=") == list("137+58=")
    assert len(tok.encode("95", add_special_tokens=False)) == 2
    assert task.verifiable and task.gold_metric == "exact-match accuracy"
    assert task.model_config("gpt2", size="test").vocab_size == len(tok)


def test_config_validation():
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTaskConfig(ops=("*",))
    with pytest.raises(ValueError, match="max_operand"):
        ArithmeticTaskConfig(max_operand=0)
    both = ArithmeticTaskConfig(ops=("+", "-"), max_operand=3)
    train, held = ar._split(both)
    assert len(train) + len(held) == 2 * 16


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo"])
@pytest.mark.parametrize("name", ["tiny_arithmetic", "tiny_sentiment"])
def test_task_flag_and_presets(name, preset):
    _, cfg, _ = parse(["pipeline", "--task", name, "--preset", preset, "--ppo.iterations", "3"])
    assert cfg.sft.data.task == cfg.rm.data.task == cfg.ppo.data.task == name
    assert cfg.ppo.algo.advantage_estimator == get_preset_estimator(preset)
    assert cfg.ppo.iterations == 3  # overrides still win over the task and the presets
    if name == "tiny_arithmetic":
        assert cfg.ppo.reward.function == "task:gold" and cfg.ppo.generation.max_new_tokens == 6
    else:
        assert cfg.ppo.reward.function is None  # the reward model of the pipeline
    with pytest.raises(ValueError, match="--task 'nope'"):
        parse(["pipeline", "--task", "nope"])


def get_preset_estimator(preset):
    from rlhf_fast.algos import PRESETS

    return PRESETS[preset].advantage_estimator


def test_dynamic_sampling_needs_groups():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        parse(["pipeline", "--task", "tiny_arithmetic", "--preset", "dapo", "--ppo.samples_per_prompt", "1"])


# ---- DAPO dynamic sampling in the rollout stage -------------------------------------------------


class _FixedGenerator:
    """Answers "1" + EOS to every prompt (the reward function below decides the scores)."""

    def __init__(self, tok):
        from rlhf_fast.engine import EngineStats

        self.tok, self.stats, self.calls = tok, EngineStats(), []

    def generate(self, ids, mask, params):
        import torch

        from rlhf_fast.engine import GenerationOutput

        self.calls.append((ids.shape[0], params.seed))
        one = self.tok.convert_tokens_to_ids("1")
        resp = torch.tensor([[one, self.tok.eos_token_id]] * ids.shape[0])
        return GenerationOutput(torch.cat([ids, resp], 1), torch.ones_like(resp, dtype=torch.bool),
                                torch.zeros(resp.shape))

    def on_weights_updated(self):
        pass


def _stage(task, algo_overrides, rounds_scores):
    """A RolloutStage on task prompts with 4 prompts x 2 samples and a reward function that
    returns ``rounds_scores[call]`` (one list of 8 scores per rollout round)."""
    import torch

    from rlhf_fast.config import PPOConfig
    from rlhf_fast.data import PromptDataset, prepare_tokenizer
    from rlhf_fast.trainers.rollout import PromptSchedule, RolloutStage, Scorer

    tok = prepare_tokenizer(task.tokenizer)
    cfg = PPOConfig(rollout_batch_size=4, samples_per_prompt=2)
    cfg.algo = cfg.algo.replace(advantage_estimator="grpo", **algo_overrides)
    cfg.generation.max_new_tokens = 2
    prompts = PromptDataset(task.prompt_records("train"), tok)
    calls = []

    def reward(ps, rs):
        calls.append(list(ps))
        return rounds_scores[len(calls) - 1]

    rounds = cfg.algo.max_sampling_rounds if cfg.algo.dynamic_sampling else 1
    schedule = PromptSchedule(prompts, prompts.collator(), seed=0, global_prompts=4, samples_per_prompt=2, rank=0,
                              world_size=1, draws_per_iteration=rounds)
    gen = _FixedGenerator(tok)
    stage = RolloutStage(cfg, generator=gen, schedule=schedule, scorer=Scorer(reward_fn=reward, tokenizer=tok,
                                                                               batch_size=8),
                         tokenizer=tok, stop_token_ids=[], device=torch.device("cpu"), rank=0)
    return stage, calls, gen


def test_dynamic_sampling_drops_uniform_groups_and_refills(task):
    import torch

    round0 = [1, 1, 0, 1, 0, 0, 1, 1]  # only group 1 (rows 2, 3) is informative
    round1 = [0, 1, 1, 0, 0, 1, 1, 0]  # every group informative: three are needed
    stage, calls, gen = _stage(task, dict(dynamic_sampling=True, max_sampling_rounds=3), [round0, round1])
    rollout, extras = stage.collect(iteration=0, seed=5)
    assert len(calls) == 2 and extras.sampling_rounds == 2 and extras.informative_frac == 0.25
    assert rollout.batch_size == 8 and rollout.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert rollout.scores.tolist() == [0, 1, 0, 1, 1, 0, 0, 1]  # group 1 of round 0, then groups 0-2 of round 1
    assert A_informative(rollout).all()
    assert calls[1] != calls[0] and gen.calls[1][1] != gen.calls[0][1]  # fresh prompts, a fresh seed
    again, _, _ = _stage(task, dict(dynamic_sampling=True, max_sampling_rounds=3), [round0, round1])
    r2, _ = again.collect(iteration=0, seed=5)
    assert torch.equal(r2.query_ids, rollout.query_ids)  # a function of (seed, iteration) only


def A_informative(rollout):
    from rlhf_fast.algos import informative_groups

    return informative_groups(rollout.scores, rollout.group_ids)


def test_dynamic_sampling_fills_up_after_the_last_round(task):
    uniform = [1, 1, 0, 0, 1, 1, 0, 0]
    stage, calls, _ = _stage(task, dict(dynamic_sampling=True, max_sampling_rounds=2), [uniform, uniform])
    rollout, extras = stage.collect(iteration=3, seed=0)
    assert len(calls) == 2 and extras.sampling_rounds == 2 and extras.informative_frac == 0.0
    assert rollout.batch_size == 8  # completed with dropped groups of the last round


def test_without_dynamic_sampling_one_round_and_overlong_penalty(task):
    stage, calls, _ = _stage(task, dict(overlong_buffer_fraction=0.5), [[1, 1, 0, 0, 1, 1, 0, 0]])
    rollout, extras = stage.collect(iteration=0, seed=0)
    assert len(calls) == 1 and extras.sampling_rounds == 1
    # responses of 2 tokens with max_new_tokens 2 and a buffer of 1: (1 - 2) / 1 = -1 each
    assert rollout.scores.tolist() == [0, 0, -1, -1, 0, 0, -1, -1]
    assert extras.raw_scores.tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
