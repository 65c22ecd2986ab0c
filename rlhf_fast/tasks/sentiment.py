"""``tiny_sentiment``: the built-in task. A tiny synthetic English, a hidden sentiment-lexicon gold
reward, and preference pairs labelled from it through Bradley-Terry noise, all generated locally
and deterministically from a seed (the shape of lm-human-preferences' sentiment task, small
enough for a 1-5 M parameter model on 2 CPU cores).

Prompts are sentence openings ("the old cat saw", "emma visited"); responses continue them
(" a happy dog and it was cold near the river ."). Every adjective slot of the SFT corpus is
positive, negative or neutral with probabilities 0.3 / 0.3 / 0.4, so the SFT policy's mean gold
score is about 0 while the best responses score 6 or more: PPO has room to climb.

The gold reward (``gold_reward``), per response, on whitespace-separated words:

    + 1   per distinct positive word          - 1   per negative word (every occurrence)
    - 0.5 per repeat of a content word        - 1   per word outside the language
    - 0.5 per word beyond ``MAX_WORDS``       - 1   if the response does not end with "."
    an empty response scores -1.

The guards (distinct positives only, repetition, out-of-language words, length, ending) keep the
obvious hacks ("good good good ...", byte soup, never stopping) from paying.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

POSITIVE = (
    "good", "happy", "kind", "bright", "lovely", "great", "nice", "warm",
    "gentle", "calm", "brave", "sweet", "cheerful", "wonderful", "friendly", "glad",
)
NEGATIVE = (
    "bad", "sad", "cold", "dark", "angry", "ugly", "awful", "mean",
    "grim", "sick", "dull", "rude", "gloomy", "nasty", "bitter", "lonely",
)
NEUTRAL = (
    "old", "big", "small", "red", "blue", "green", "tall", "short", "round", "loud",
    "quiet", "young", "long", "flat", "soft", "wet", "brown", "heavy", "plain", "new",
)
NOUNS = (
    "cat", "dog", "bird", "tree", "house", "river", "car", "book", "child", "man",
    "woman", "garden", "city", "road", "song", "day", "night", "room", "door", "window",
    "boat", "hill", "lake", "town", "friend", "teacher", "farmer", "baby", "horse", "apple",
    "cake", "letter", "box", "ball", "chair", "table", "flower", "cloud", "street", "school",
)
VERBS = (
    "saw", "found", "liked", "took", "met", "made", "heard", "painted", "followed", "visited",
    "watched", "carried", "built", "opened", "bought", "wanted", "helped", "called", "cleaned",
    "passed", "kept", "left", "showed", "noticed",
)
NAMES = ("anna", "ben", "clara", "david", "emma", "felix", "grace", "henry", "iris", "jack", "kate", "leo")
FUNCTION_WORDS = (
    "the", "a", "and", "it", "was", "were", "with", "very", "near", "but", "so", "they",
    "he", "she", "felt", "then", "too", ".",
)
LEXICON = frozenset(POSITIVE + NEGATIVE + NEUTRAL + NOUNS + VERBS + NAMES + FUNCTION_WORDS)
_POSITIVE, _NEGATIVE, _FUNCTION = frozenset(POSITIVE), frozenset(NEGATIVE), frozenset(FUNCTION_WORDS)
MAX_WORDS = 24

TASK_VERSION = 1  # bump when the language, the reward or the generators change (cache key)


# ---- the gold reward -------------------------------------------------------------------------

def gold_score(response: str) -> float:
    """The hidden gold reward of one response (see the module docstring). Pure and deterministic."""
    words = response.lower().replace(".", " . ").split()
    if not words:
        return -1.0
    positives: set[str] = set()
    negatives = repeats = unknown = 0
    seen: set[str] = set()
    for w in words:
        if w not in LEXICON:
            unknown += 1
            continue
        if w in _POSITIVE:
            positives.add(w)
        elif w in _NEGATIVE:
            negatives += 1
        if w not in _FUNCTION:
            repeats += w in seen
            seen.add(w)
    score = len(positives) - negatives - 0.5 * repeats - unknown - 0.5 * max(0, len(words) - MAX_WORDS)
    if words[-1] != ".":
        score -= 1.0
    return float(score)


def gold_reward(responses: Sequence[str], prompts: Optional[Sequence[str]] = None) -> list[float]:
    """Gold scores of decoded responses (``prompts`` is accepted for a uniform reward-function
    signature; this task's reward does not depend on them)."""
    return [gold_score(r) for r in responses]


def bradley_terry_probability(score_a: float, score_b: float, beta: float) -> float:
    """P(a preferred over b) = sigmoid(beta * (g(a) - g(b)))."""
    return 1.0 / (1.0 + math.exp(-beta * (score_a - score_b)))


# ---- the language ----------------------------------------------------------------------------

def _adjective(rng: random.Random) -> str:
    u = rng.random()
    pool = POSITIVE if u < 0.3 else NEGATIVE if u < 0.6 else NEUTRAL
    return rng.choice(pool)


def _noun_phrase(rng: random.Random, det: Optional[str] = None, adj_prob: float = 0.6) -> str:
    det = det or rng.choice(("the", "a"))
    if rng.random() < adj_prob:
        return f"{det} {_adjective(rng)} {rng.choice(NOUNS)}"
    return f"{det} {rng.choice(NOUNS)}"


def sample_prompt(rng: random.Random) -> str:
    subject = rng.choice(NAMES) if rng.random() < 0.3 else _noun_phrase(rng, "the", adj_prob=0.5)
    return f"{subject} {rng.choice(VERBS)}"


def sample_response(rng: random.Random) -> str:
    """A continuation of any prompt: an object, 0-3 clauses, a full stop; with a leading space
    (N+: completions get a leading space), so ``prompt + response`` reads as one sentence."""
    parts = [_noun_phrase(rng)]
    for _ in range(rng.choice((0, 1, 1, 2, 2, 3))):
        kind = rng.randrange(6)
        if kind == 0:
            parts.append(f"and it was {_adjective(rng)}")
        elif kind == 1:
            parts.append(f"near {_noun_phrase(rng, 'the')}")
        elif kind == 2:
            parts.append(f"with {_noun_phrase(rng, 'a', adj_prob=1.0)}")
        elif kind == 3:
            parts.append(f"and {rng.choice(('he', 'she', 'they'))} felt {_adjective(rng)}")
        elif kind == 4:
            parts.append(f"but the {rng.choice(NOUNS)} was {_adjective(rng)}")
        else:
            parts.append(f"so they were very {_adjective(rng)}")
    return " " + " ".join(parts) + " ."


# ---- the task --------------------------------------------------------------------------------

@dataclass(frozen=True)
class SentimentTaskConfig:
    """Sizes and noise of the generated data."""

    seed: int = 0
    """Seeds every generator; same seed, same data and tokenizer."""
    num_sft: int = 10000
    """Prompt + response pairs in the SFT corpus (about 20 tokens each)."""
    num_train_prompts: int = 4000
    """Prompts for PPO rollouts."""
    num_eval_prompts: int = 512
    """Held-out prompts for evaluation."""
    num_preference_pairs: int = 10000
    """Comparisons for reward-model training."""
    bt_beta: float = 1.5
    """Bradley-Terry sharpness: P(a > b) = sigmoid(bt_beta * (g(a) - g(b))); with 1.5 a one-point
    gold gap is labelled correctly 82% of the time, a two-point gap 95%."""
    vocab_size: int = 1024
    """Target size of the byte-level BPE vocabulary trained on the corpus (special tokens included)."""

    def cache_key(self) -> str:
        blob = json.dumps({"v": TASK_VERSION, "seed": self.seed, "vocab_size": self.vocab_size}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rng(seed: int, stream: str) -> random.Random:
    # An independent, reproducible stream per data product (str seeds hash deterministically).
    return random.Random(f"tiny_sentiment/{seed}/{stream}")


def make_sft_records(config: SentimentTaskConfig) -> list[dict]:
    rng = _rng(config.seed, "sft")
    return [{"prompt": sample_prompt(rng), "response": sample_response(rng)} for _ in range(config.num_sft)]


def make_prompt_records(config: SentimentTaskConfig, split: str = "train") -> list[dict]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    n = config.num_train_prompts if split == "train" else config.num_eval_prompts
    rng = _rng(config.seed, f"prompts-{split}")
    return [{"prompt": sample_prompt(rng)} for _ in range(n)]


def make_preference_records(config: SentimentTaskConfig) -> list[dict]:
    """Pairs of corpus-distribution responses to one prompt, labelled by a Bradley-Terry draw on
    the gold scores; the gold scores are kept (``chosen_gold`` / ``rejected_gold``) for analysis."""
    rng = _rng(config.seed, "preferences")
    out = []
    for _ in range(config.num_preference_pairs):
        prompt, a = sample_prompt(rng), sample_response(rng)
        b = sample_response(rng)
        while b == a:
            b = sample_response(rng)
        ga, gb = gold_score(a), gold_score(b)
        a_wins = rng.random() < bradley_terry_probability(ga, gb, config.bt_beta)
        (c, gc), (r, gr) = ((a, ga), (b, gb)) if a_wins else ((b, gb), (a, ga))
        out.append({"prompt": prompt, "chosen": c, "rejected": r, "chosen_gold": gc, "rejected_gold": gr})
    return out


def expected_agreement(records: Sequence[dict], beta: float) -> tuple[float, int]:
    """Expected fraction of pairs (with unequal gold scores) whose label agrees with the gold
    order, under the Bradley-Terry model; and the number of such pairs."""
    probs = [
        bradley_terry_probability(max(r["chosen_gold"], r["rejected_gold"]), min(r["chosen_gold"], r["rejected_gold"]), beta)
        for r in records if r["chosen_gold"] != r["rejected_gold"]
    ]
    return (sum(probs) / len(probs) if probs else float("nan")), len(probs)


TOKENIZER_CORPUS_SIZE = 5000


def tokenizer_corpus(config: SentimentTaskConfig) -> list[str]:
    """Texts the tokenizer is trained on: ``TOKENIZER_CORPUS_SIZE`` sentences from their own random
    stream (so the tokenizer depends only on the seed and vocab size, its cache key, not on the
    corpus sizes) plus every word of the language once."""
    rng = _rng(config.seed, "tokenizer")
    texts = [sample_prompt(rng) + sample_response(rng) for _ in range(TOKENIZER_CORPUS_SIZE)]
    texts.append(" ".join(sorted(LEXICON)))
    return texts


def config_dict(config: SentimentTaskConfig) -> dict:
    return asdict(config)
