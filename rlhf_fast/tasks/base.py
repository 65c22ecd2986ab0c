"""What every built-in task shares: the tiny model config sized to its tokenizer and the JSONL
export of its records (``TinySentimentTask``, ``TinyArithmeticTask``)."""

from __future__ import annotations

from pathlib import Path

from rlhf_fast.tasks.tiny_models import tiny_config


class BuiltinTask:
    """A subclass provides ``tokenizer``, ``sft_records()``, ``prompt_records(split)`` and, unless
    ``verifiable`` (a checked reward, no preference pairs), ``preference_records()``."""

    verifiable = False

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
