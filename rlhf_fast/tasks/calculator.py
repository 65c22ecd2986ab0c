"""``tiny_calculator``: the built-in multi-turn tool task (docs/architecture.md, "Multi-turn
episodes"). Problems are chains of steps on a start number, ``"17, add 12, times 3?"``; the model
may call a calculator by ending a turn with ``<calc>17+12</calc>``, the environment
(``envs/calculator.py``, registered as "tiny_calculator") appends the exact value (``29``), and the
episode ends with the final answer ``=87`` and EOS, checked exactly (reward 1 or 0).

Everything is generated locally from ``config.seed``: a character-level tokenizer (byte-level BPE
with no merges) plus ``<calc>`` and ``</calc>`` as single tokens (so ``</calc>`` can end a turn),
the SFT transcripts, the RL prompts and the held-out evaluation prompts. The SFT transcripts use
the calculator correctly at every step (no injected errors) and have ``sft_steps`` steps (1-3); RL
and evaluation problems have ``rl_steps`` steps (2-3): longer on average than the SFT data's, and
the SFT stage is short (300 steps): that is the room RL is given, never wrong labels. Held-out problems appear nowhere in the
SFT data or the RL prompts.

The SFT transcript holds the calculator's replies as text (a supervised model has no environment);
PPO's episodes get them from the environment as tokens that are attended to but never trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Optional, Sequence

from rlhf_fast.envs.calculator import CALL_CLOSE, CALL_OPEN, EOS_TEXT, apply, calculate, final_answer, solve
from rlhf_fast.tasks.base import BuiltinTask

TASK_VERSION = 1  # bump when the format, the reward or the generators change (cache key)
_WORDS = {"+": "add", "-": "minus", "*": "times"}


@dataclass(frozen=True)
class CalculatorTaskConfig:
    """Sizes and ranges of the generated problems."""

    seed: int = 0
    """Seeds every generator; same seed, same data."""
    max_start: int = 30
    """The start number is drawn from [1, max_start]."""
    max_addend: int = 9
    """add / minus operands are drawn from [1, max_addend] (a minus never goes below 0)."""
    max_factor: int = 5
    """times operands are drawn from [2, max_factor]."""
    sft_steps: tuple = (1, 3)
    """Steps per SFT problem, [low, high] (uniform): a third of the SFT problems are 1-step ones,
    which RL never sees. (1, 2) left RL no room on 3-step problems: the SFT model never made a third
    call (pass@8 0.04 on them), so there was nothing for RL to reinforce.)"""
    rl_steps: tuple = (2, 3)
    """Steps per RL and held-out problem, [low, high]."""
    num_sft: int = 4000
    """SFT transcripts."""
    num_train_prompts: int = 4000
    """RL prompts (none held out)."""
    num_eval_prompts: int = 256
    """Held-out problems for evaluation (never in the SFT data or the RL prompts)."""
    vocab_size: int = 258
    """256 byte tokens + EOS + PAD (no BPE merges: one token per character); the two tool-call
    markers are added after it."""

    def __post_init__(self) -> None:
        for name in ("max_start", "max_addend", "num_sft", "num_train_prompts", "num_eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_factor < 2:
            raise ValueError(f"max_factor must be >= 2, got {self.max_factor}")
        for name in ("sft_steps", "rl_steps"):
            lo_hi = tuple(getattr(self, name))
            if len(lo_hi) != 2 or not 1 <= lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"{name} must be (low, high) with 1 <= low <= high, got {getattr(self, name)!r}")

    def cache_key(self) -> str:
        blob = json.dumps({"v": TASK_VERSION, "seed": self.seed, "vocab_size": self.vocab_size,
                           "extra": [CALL_OPEN, CALL_CLOSE]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"tiny_calculator/{seed}/{stream}")


def draw_problem(rng: random.Random, config: CalculatorTaskConfig, steps: tuple) -> str:
    """A problem prompt with a step count in ``steps`` (low, high)."""
    value = rng.randint(1, config.max_start)
    parts = [str(value)]
    for _ in range(rng.randint(*steps)):
        op = rng.choice("+-*")
        if op == "*":
            b = rng.randint(2, config.max_factor)
        elif op == "-":
            if value < 1:
                op = "+"
            b = rng.randint(1, min(config.max_addend, max(value, 1)))
        else:
            b = rng.randint(1, config.max_addend)
        value = apply(value, op, b)
        parts.append(f"{_WORDS[op]} {b}")
    return ", ".join(parts) + "?"


def transcript(prompt: str) -> str:
    """The correct tool use for a problem: one calculator call per step, then ``=answer``."""
    from rlhf_fast.envs.calculator import problem_steps

    value, steps = problem_steps(prompt)
    out = []
    for op, b in steps:
        result = calculate(f"{value}{op}{b}")
        out.append(f"{CALL_OPEN}{value}{op}{b}{CALL_CLOSE}{result}")
        value = int(result)
    return "".join(out) + f"={value}"


def _problems(config: CalculatorTaskConfig) -> dict[str, list[str]]:
    """Held-out, RL and SFT problems; the held-out ones are removed from the other two."""
    held_rng = _rng(config.seed, "eval")
    held: list[str] = []
    seen: set = set()
    while len(held) < config.num_eval_prompts:
        p = draw_problem(held_rng, config, config.rl_steps)
        if p not in seen:
            seen.add(p)
            held.append(p)

    def fresh(stream: str, n: int, steps: tuple) -> list[str]:
        rng, out = _rng(config.seed, stream), []
        while len(out) < n:
            p = draw_problem(rng, config, steps)
            if p not in seen:
                out.append(p)
        return out

    return {"eval": held, "train": fresh("train", config.num_train_prompts, config.rl_steps),
            "sft": fresh("sft", config.num_sft, config.sft_steps)}


def gold_score(prompt: str, response: str) -> float:
    """1.0 when the episode's text (the calculator's replies included) ends with ``=answer``."""
    text = response.replace(EOS_TEXT, "").strip()
    cut = text.rfind(CALL_CLOSE)
    tail = text[cut + len(CALL_CLOSE):] if cut >= 0 else text
    eq = tail.find("=")
    return 1.0 if eq >= 0 and final_answer(tail[eq:]) == solve(prompt) else 0.0


class TinyCalculatorTask(BuiltinTask):
    """The built-in ``tiny_calculator`` task (module docstring). ``verifiable``: PPO is scored by the
    environment ``env`` ("tiny_calculator"), no reward model is trained."""

    name = "tiny_calculator"
    verifiable = True
    gold_metric = "exact-match accuracy"
    extra_tokens = (CALL_OPEN, CALL_CLOSE)
    env = "tiny_calculator"
    max_prompt_length = 40
    """Tokens (characters): a 3-step problem is at most ~32."""
    max_response_length = 48
    """Tokens of a correct 3-step episode, calls, replies and EOS included (at most ~44)."""

    config_class = CalculatorTaskConfig

    def tokenizer_corpus(self) -> list[str]:
        return ["0123456789+-*=?, ", "add minus times"]

    def sft_records(self) -> list[dict]:
        return [{"prompt": p, "response": transcript(p)} for p in _problems(self.config)["sft"]]

    def prompt_records(self, split: str = "train") -> list[dict]:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return [{"prompt": p} for p in _problems(self.config)[split]]

    def preference_records(self) -> list[dict]:
        raise ValueError("tiny_calculator has a verifiable reward and no preference pairs: PPO is scored by the "
                         "environment (ppo.env tiny_calculator)")

    def gold_reward(self, responses: Sequence[str], prompts: Optional[Sequence[str]] = None) -> list[float]:
        if prompts is None or len(prompts) != len(responses):
            raise ValueError("tiny_calculator's reward needs one prompt per response (the answer is checked against it)")
        return [gold_score(p, r) for p, r in zip(prompts, responses)]
