"""``tiny_arithmetic``: the built-in task with a verifiable reward. Prompts are sums of two small
numbers ("37+58="), responses the result ("95"), and the reward is an exact check of the answer,
so no reward model is trained: the pipeline scores rollouts with the checker itself (the RLVR
setting of DeepSeek-R1 / DAPO / Dr. GRPO, at the size of a 2-core CPU run).

Everything is generated locally from ``config.seed``: a character-level tokenizer (a byte-level
BPE trained with no merges, so every digit is one token), the SFT corpus, the RL prompts and the
held-out evaluation prompts. The held-out prompts are operand pairs that appear nowhere in the
SFT corpus or the RL prompts, so the gold metric — exact-match accuracy on them — measures
arithmetic, not recall. A fraction of the SFT answers are off by one (``sft_noise``): the SFT
model learns the slips along with the arithmetic, and the checked reward is what removes them.

The reward (``gold_score``): 1.0 when the response, stripped of surrounding whitespace, is exactly
the decimal result; 0.0 otherwise (a wrong number, extra text, an empty response).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from rlhf_fast.tasks.base import BuiltinTask

TASK_VERSION = 2  # bump when the format, the reward or the generators change (cache key)
_PROMPT = re.compile(r"^\s*(\d+)\s*([+\-])\s*(\d+)\s*=\s*$")


# ---- the checker ------------------------------------------------------------------------------


def answer(prompt: str) -> int:
    """The exact result of a prompt such as "37+58=" (ValueError naming the prompt otherwise)."""
    m = _PROMPT.match(prompt)
    if m is None:
        raise ValueError(f"not a tiny_arithmetic prompt (expected like '37+58='): {prompt!r}")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return a + b if op == "+" else a - b


def gold_score(prompt: str, response: str) -> float:
    """1.0 when ``response.strip()`` is exactly ``str(answer(prompt))``, else 0.0."""
    return 1.0 if response.strip() == str(answer(prompt)) else 0.0


def gold_reward(responses: Sequence[str], prompts: Optional[Sequence[str]] = None) -> list[float]:
    """Exact-match scores of decoded responses to ``prompts`` (required: the answer depends on them)."""
    if prompts is None:
        raise ValueError("tiny_arithmetic's reward needs the prompts (the answer is checked against them)")
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    return [gold_score(p, r) for p, r in zip(prompts, responses)]


# ---- the data ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArithmeticTaskConfig:
    """Sizes of the generated data and the range of the operands."""

    seed: int = 0
    """Seeds every generator; same seed, same data."""
    max_operand: int = 99
    """Operands are drawn from [0, max_operand] (99: two-digit sums with carries, results up to 198)."""
    ops: tuple = ("+",)
    """Operators drawn uniformly: "+" and / or "-" (a difference may be negative)."""
    eval_fraction: float = 0.1
    """Fraction of all operand pairs held out for evaluation (never in the SFT data or RL prompts)."""
    num_sft: int = 10000
    """Prompt + answer pairs in the SFT corpus (drawn with replacement from the non-held-out pairs)."""
    num_train_prompts: int = 4000
    """Prompts for RL rollouts (non-held-out pairs)."""
    num_eval_prompts: int = 512
    """Held-out prompts for evaluation (at most the held-out pairs)."""
    sft_noise: float = 0.3
    """Fraction of SFT answers that are off by one (answer - 1 or answer + 1, drawn uniformly): the
    demonstrations are imperfect, as human- or model-written ones are, so the SFT model imitates the
    slips too and samples a near-miss about as often. A checked reward removes what imitation
    copied, which is the gain RL with a verifiable reward is for; 0 gives clean demonstrations."""
    vocab_size: int = 258
    """256 byte tokens + EOS + PAD: a character-level tokenizer (no BPE merges), one token per digit."""

    def __post_init__(self) -> None:
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not self.ops or any(o not in ("+", "-") for o in self.ops):
            raise ValueError(f"ops must be a non-empty subset of ('+', '-'), got {self.ops!r}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must lie in (0, 1), got {self.eval_fraction}")
        if not 0 <= self.sft_noise < 1:
            raise ValueError(f"sft_noise must lie in [0, 1), got {self.sft_noise}")
        for name in ("num_sft", "num_train_prompts", "num_eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def cache_key(self) -> str:
        blob = json.dumps({"v": TASK_VERSION, "seed": self.seed, "vocab_size": self.vocab_size}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"tiny_arithmetic/{seed}/{stream}")


def _split(config: ArithmeticTaskConfig) -> tuple[list, list]:
    """(train problems, held-out problems): every (a, op, b) with a, b in [0, max_operand], shuffled
    with the seed, the first ``eval_fraction`` held out."""
    n = config.max_operand + 1
    problems = [(a, op, b) for op in config.ops for a in range(n) for b in range(n)]
    _rng(config.seed, "split").shuffle(problems)
    k = max(1, int(round(len(problems) * config.eval_fraction)))
    return problems[k:], problems[:k]


def format_prompt(a: int, op: str, b: int) -> str:
    return f"{a}{op}{b}="


def make_sft_records(config: ArithmeticTaskConfig) -> list[dict]:
    train, _ = _split(config)
    rng = _rng(config.seed, "sft")
    out = []
    for _ in range(config.num_sft):
        p = format_prompt(*rng.choice(train))
        a = answer(p)
        if rng.random() < config.sft_noise:  # a slip in the demonstration (ArithmeticTaskConfig.sft_noise)
            a += rng.choice((-1, 1))
        out.append({"prompt": p, "response": str(a)})
    return out


def make_prompt_records(config: ArithmeticTaskConfig, split: str = "train") -> list[dict]:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    train, held = _split(config)
    if split == "eval":
        return [{"prompt": format_prompt(*p)} for p in held[: config.num_eval_prompts]]
    rng = _rng(config.seed, "prompts-train")
    return [{"prompt": format_prompt(*rng.choice(train))} for _ in range(config.num_train_prompts)]


def tokenizer_corpus(config: ArithmeticTaskConfig) -> list[str]:
    """Every character the task writes (with ``vocab_size`` 258 the BPE learns no merges anyway)."""
    return ["0123456789+-=", "12+34=46", "98-7=91"]


# ---- the task object --------------------------------------------------------------------------


class TinyArithmeticTask(BuiltinTask):
    """The built-in ``tiny_arithmetic`` task (same interface as ``TinySentimentTask``):
    ``tokenizer``, ``sft_records()``, ``prompt_records(split)``, ``gold_reward(responses,
    prompts)`` (exact match), ``model_config(arch, size)``, ``write_jsonl(directory)``.
    ``verifiable = True``: there are no preference pairs; PPO is scored by ``gold_reward`` itself
    (``ppo.reward.function = "task:gold"``) and the pipeline trains no reward model."""

    name = "tiny_arithmetic"
    verifiable = True
    gold_metric = "exact-match accuracy"
    max_prompt_length = 8
    """Tokens: "199+199=" at most with the default operands."""
    max_response_length = 5
    """Tokens, EOS included."""

    config_class = ArithmeticTaskConfig

    def tokenizer_corpus(self) -> list[str]:
        return tokenizer_corpus(self.config)

    def sft_records(self) -> list[dict]:
        return make_sft_records(self.config)

    def prompt_records(self, split: str = "train") -> list[dict]:
        return make_prompt_records(self.config, split)

    def preference_records(self) -> list[dict]:
        raise ValueError("tiny_arithmetic has a verifiable reward and no preference pairs: score PPO with "
                         "ppo.reward.function 'task:gold' (the pipeline then trains no reward model)")

    def gold_reward(self, responses: Sequence[str], prompts: Optional[Sequence[str]] = None) -> list[float]:
        return gold_reward(responses, prompts)


def config_dict(config: ArithmeticTaskConfig) -> dict:
    return asdict(config)
