"""rlhf_fast.tasks: the tiny_sentiment task (tokenizer, corpus, gold reward, Bradley-Terry labels)
and the tiny model configs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rlhf_fast.data import PreferenceDataset, PromptDataset, SFTDataset
from rlhf_fast.models import Policy, RewardModel
from rlhf_fast.tasks import ARCHITECTURES, SentimentTaskConfig, get_task, gold_score, tiny_config
from rlhf_fast.tasks import sentiment

SMALL = dict(num_sft=600, num_train_prompts=200, num_eval_prompts=50, num_preference_pairs=400)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return get_task("tiny_sentiment", cache_dir=tmp_path_factory.mktemp("cache"), **SMALL)


# ---- tokenizer -----------------------------------------------------------------------------------

def test_tokenizer_is_local_deterministic_and_cached(task, tmp_path):
    tok = task.tokenizer
    assert 500 <= len(tok) <= 2000
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "[PAD]" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert (task.tokenizer_dir / "tokenizer.json").is_file()
    # Trained again from scratch in another cache dir: byte-identical tokenizer.json.
    other = get_task(cache_dir=tmp_path, **SMALL)
    assert other.tokenizer.get_vocab() == tok.get_vocab()
    assert (other.tokenizer_dir / "tokenizer.json").read_text() == (task.tokenizer_dir / "tokenizer.json").read_text()
    # The corpus sizes do not change the tokenizer (nor its cache key); the seed does.
    assert get_task(cache_dir=tmp_path, num_sft=10).tokenizer_dir == other.tokenizer_dir
    assert get_task(cache_dir=tmp_path, seed=1).tokenizer_dir != other.tokenizer_dir
    # Every word of the language is one token; text round-trips.
    for r in task.sft_records()[:50]:
        text = r["prompt"] + r["response"]
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text.split()) and tok.decode(ids) == text


# ---- corpus --------------------------------------------------------------------------------------

def test_generated_data_is_deterministic_and_seeded(task):
    again = get_task(cache_dir=task.cache_dir, **SMALL)
    assert again.sft_records() == task.sft_records()
    assert again.preference_records() == task.preference_records()
    assert get_task(cache_dir=task.cache_dir, seed=1, **SMALL).sft_records() != task.sft_records()
    assert len(task.sft_records()) == 600 and len(task.prompt_records("eval")) == 50
    train = {r["prompt"] for r in task.prompt_records("train")}
    assert train != {r["prompt"] for r in task.prompt_records("eval")}


def test_task_files_load_through_the_data_pipeline(task, tmp_path):
    paths = task.write_jsonl(tmp_path)
    tok = task.tokenizer
    n = len(tok)
    sft = SFTDataset(paths["sft"], tok, max_prompt_length=task.max_prompt_length,
                     max_response_length=task.max_response_length, truncation=None)
    prompts = PromptDataset(paths["prompts_eval"], tok, max_prompt_length=task.max_prompt_length, truncation=None)
    prefs = PreferenceDataset(paths["preferences"], tok, max_response_length=task.max_response_length)
    assert len(tok) == n  # the task tokenizer already has its own pad: nothing added
    assert len(sft) == 600 and len(prompts) == 50 and len(prefs) == 400
    assert all(int(it["input_ids"][-1]) == tok.eos_token_id for it in sft.items)  # nothing truncated


# ---- gold reward ---------------------------------------------------------------------------------

def test_gold_reward_hand_checked_values():
    assert gold_score(" a happy dog .") == 1.0
    assert gold_score(" a happy dog and it was sad .") == 0.0
    assert gold_score(" a happy dog with a happy cat .") == 1.0 - 0.5  # "happy" counts once, and its repeat costs 0.5
    assert gold_score(" a good dog with a kind cat and it was lovely .") == 3.0
    assert gold_score(" a good dog") == 1.0 - 1.0  # no full stop
    assert gold_score(" a good zzz dog .") == 0.0  # one out-of-language word
    assert gold_score("") == -1.0
    long = " the " + " ".join(["cat"] * 30) + " ."
    words = 32
    assert gold_score(long) == -0.5 * 29 - 0.5 * (words - sentiment.MAX_WORDS)


def test_gold_reward_deterministic_and_separates_random_from_corpus(task):
    responses = [r["response"] for r in task.sft_records()]
    scores = task.gold_reward(responses)
    assert scores == task.gold_reward(responses) == [gold_score(r) for r in responses]
    corpus_mean = sum(scores) / len(scores)
    assert abs(corpus_mean) < 0.3  # adjectives are 30% positive / 30% negative: mean ~ 0
    rng = random.Random(0)
    tok = task.tokenizer
    random_ids = [[rng.randrange(len(tok)) for _ in range(12)] for _ in range(200)]
    random_mean = sum(task.gold_reward_from_ids(random_ids)) / 200
    assert random_mean < corpus_mean - 3
    # Room for PPO: responses written to please the gold reward score far above the corpus.
    best = " a kind dog with a happy cat and it was lovely near the bright tree and she felt glad ."
    assert gold_score(best) >= corpus_mean + 5


# ---- Bradley-Terry labels ------------------------------------------------------------------------

def test_preference_labels_agree_with_gold_at_the_configured_rate(tmp_path):
    """Labels follow P(chosen is the gold-better) = sigmoid(beta * |gap|). On 4000 pairs the
    empirical agreement must lie within 4 binomial standard errors of the expected rate (about
    +-0.022; a wrong beta of 1.0 instead of 1.5 would move the expected rate by ~0.06)."""
    task = get_task(cache_dir=tmp_path, num_preference_pairs=4000)
    recs = task.preference_records()
    for r in recs[:200]:
        assert r["chosen"] != r["rejected"]
        assert (r["chosen_gold"], r["rejected_gold"]) == (gold_score(r["chosen"]), gold_score(r["rejected"]))
    beta = task.config.bt_beta
    expected, n = sentiment.expected_agreement(recs, beta)
    agree = sum(r["chosen_gold"] > r["rejected_gold"] for r in recs if r["chosen_gold"] != r["rejected_gold"]) / n
    se = math.sqrt(expected * (1 - expected) / n)
    assert abs(agree - expected) < 4 * se, (agree, expected, se, n)
    assert 0.75 < expected < 0.95  # noisy enough to be real, clean enough to learn
    # Per gap: a one-point gap is labelled right with probability sigmoid(beta).
    one = [r for r in recs if abs(r["chosen_gold"] - r["rejected_gold"]) == 1.0]
    p1 = 1 / (1 + math.exp(-beta))
    rate1 = sum(r["chosen_gold"] > r["rejected_gold"] for r in one) / len(one)
    assert abs(rate1 - p1) < 4 * math.sqrt(p1 * (1 - p1) / len(one))


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")
    with pytest.raises(ValueError, match="split"):
        sentiment.make_prompt_records(SentimentTaskConfig(), "dev")


# ---- tiny model configs --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_configs_use_the_tokenizer_and_run(task, arch):
    tok = task.tokenizer
    cfg = task.model_config(arch, size="test")
    assert cfg.vocab_size == len(tok) and cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    policy = Policy.from_pretrained(cfg, seed=0, value_head=True)
    rm = RewardModel.from_pretrained(cfg, new_head=True, seed=0)
    prompts = PromptDataset(task.prompt_records("eval")[:4], tok)
    batch = prompts.collator()([prompts[i] for i in range(4)])
    with torch.no_grad():
        assert policy.logprobs(batch["input_ids"], batch["attention_mask"]).logprobs.isfinite().all()
        assert rm(batch["input_ids"], batch["attention_mask"]).scores.shape == (4,)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_task_sized_models_have_1_to_5_million_parameters(arch):
    cfg = tiny_config(arch, vocab_size=640, size="task")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 1e6 <= n <= 5e6, n


def test_tiny_config_errors():
    with pytest.raises(ValueError, match="arch must be one of"):
        tiny_config("t5", vocab_size=10)
    with pytest.raises(ValueError, match="tokenizer or a vocab_size"):
        tiny_config("gpt2")
