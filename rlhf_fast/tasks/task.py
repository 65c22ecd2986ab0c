"""The task object users touch (``get_task("tiny_sentiment")``) and the task registry."""

from __future__ import annotations

from typing import Optional, Sequence

from rlhf_fast.tasks import sentiment
from rlhf_fast.tasks.base import BuiltinTask


class TinySentimentTask(BuiltinTask):
    """The built-in ``tiny_sentiment`` task: everything generated locally from ``config.seed``.

    - ``tokenizer``: byte-level BPE trained on the corpus, cached under ``cache_dir``
      (default ``$RLHF_FAST_CACHE`` or ``~/.cache/rlhf_fast``) in ``tasks/tiny_sentiment-<hash>``.
    - ``sft_records()``, ``prompt_records(split)``, ``preference_records()``: lists of dicts with
      the fields the ``rlhf_fast.data`` datasets read by default (prompt / response / chosen /
      rejected); ``write_jsonl(directory)`` writes them as JSONL files.
    - ``gold_reward(responses)``: the hidden reward (PPO's true objective; the reward model only
      sees the preference labels).
    - ``model_config(arch, size)``: a tiny GPT-2 / Llama / GPT-NeoX / Qwen2 config sized to the
      tokenizer (``size="task"``: ~3.5 M parameters).
    """

    name = "tiny_sentiment"
    verifiable = False
    """The reward is learned from preference pairs (a reward model), not checked."""
    gold_metric = "gold score"
    max_prompt_length = 8
    """Tokens; every generated prompt fits (prompts are 2-4 words)."""
    max_response_length = 32
    """Tokens, EOS included; every generated response fits."""

    config_class = sentiment.SentimentTaskConfig

    def tokenizer_corpus(self) -> list[str]:
        return sentiment.tokenizer_corpus(self.config)

    def sft_records(self) -> list[dict]:
        return sentiment.make_sft_records(self.config)

    def prompt_records(self, split: str = "train") -> list[dict]:
        return sentiment.make_prompt_records(self.config, split)

    def preference_records(self) -> list[dict]:
        return sentiment.make_preference_records(self.config)

    def gold_reward(self, responses: Sequence[str], prompts: Optional[Sequence[str]] = None) -> list[float]:
        return sentiment.gold_reward(responses, prompts)

    def gold_reward_from_ids(self, response_ids) -> list[float]:
        """Gold scores of token-id responses (special tokens such as EOS / pad are dropped)."""
        texts = self.tokenizer.batch_decode(response_ids, skip_special_tokens=True)
        return sentiment.gold_reward(texts)


from rlhf_fast.tasks.arithmetic import TinyArithmeticTask  # noqa: E402  (after TinySentimentTask: no cycle)

from rlhf_fast.tasks.calculator import TinyCalculatorTask  # noqa: E402

TASKS = {TinySentimentTask.name: TinySentimentTask, TinyArithmeticTask.name: TinyArithmeticTask,
         TinyCalculatorTask.name: TinyCalculatorTask}


def get_task(name: str = "tiny_sentiment", **kwargs):
    """A built-in task by name; ``kwargs`` go to its constructor (``cache_dir=``, config fields)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
