"""What every built-in task shares: the tiny model config sized to its tokenizer and the JSONL
export of its records (``TinySentimentTask``, ``TinyArithmeticTask``)."""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

from rlhf_fast.tasks.tiny_models import tiny_config
from rlhf_fast.tasks.tokenizer import default_cache_dir, load_or_train_tokenizer


class BuiltinTask:
    """A subclass sets ``name`` and ``config_class`` (a dataclass with ``cache_key()`` and
    ``vocab_size``) and provides ``tokenizer_corpus()``, ``sft_records()``,
    ``prompt_records(split)`` and, unless ``verifiable`` (a checked reward, no preference pairs),
    ``preference_records()``. The tokenizer is trained locally on first use and cached under
    ``cache_dir`` (default ``$RLHF_FAST_CACHE`` or ``~/.cache/rlhf_fast``)."""

    name: str
    config_class: type
    verifiable = False
    extra_tokens: tuple = ()
    """Strings added to the trained tokenizer as single tokens (``tiny_calculator``'s tool-call markers)."""
    env = None
    """The registered environment (``rlhf_fast.envs.ENVIRONMENTS``) a multi-turn task's episodes are
    played against (``ppo.env``; None: a single-turn task)."""

    def __init__(self, config=None, *, cache_dir=None, **overrides):
        config = config or self.config_class()
        self.config = replace(config, **overrides) if overrides else config
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    def tokenizer_corpus(self) -> list[str]:
        raise NotImplementedError

    @property
    def tokenizer_dir(self) -> Path:
        return self.cache_dir / "tasks" / f"{self.name}-{self.config.cache_key()}" / "tokenizer"

    @functools.cached_property
    def tokenizer(self):
        return load_or_train_tokenizer(self.tokenizer_dir, self.tokenizer_corpus, self.config.vocab_size,
                                       self.extra_tokens)

    def model_config(self, arch: str = "gpt2", *, size: str = "task", **overrides):
        """A tiny GPT-2 / Llama / GPT-NeoX / Qwen2 config sized to the task's tokenizer."""
        return tiny_config(arch, tokenizer=self.tokenizer, size=size, **overrides)

    def write_jsonl(self, directory) -> dict[str, Path]:
        """Writes sft.jsonl, prompts_train.jsonl, prompts_eval.jsonl and (unless ``verifiable``)
        preferences.jsonl; returns their paths by name."""
        from rlhf_fast.data.records import write_jsonl

        directory = Path(directory)
        out = {
            "sft": write_jsonl(directory / "sft.jsonl", self.sft_records()),
            "prompts_train": write_jsonl(directory / "prompts_train.jsonl", self.prompt_records("train")),
            "prompts_eval": write_jsonl(directory / "prompts_eval.jsonl", self.prompt_records("eval")),
        }
        if not self.verifiable:
            out["preferences"] = write_jsonl(directory / "preferences.jsonl", self.preference_records())
        return out
