"""The parts of a Hugging Face model the wrappers build on: the transformer body inside a causal LM
and the width of its hidden state. Apart from ``models.loading`` so that ``models.lora`` can use
them without importing the loader that imports it."""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel


def backbone_of(causal_lm: PreTrainedModel) -> PreTrainedModel:
    """The transformer body inside a causal LM (``GPT2LMHeadModel.transformer``,
    ``LlamaForCausalLM.model``, ``GPTNeoXForCausalLM.gpt_neox``, ...)."""
    base = getattr(causal_lm, "base_model", None)
    if base is None or base is causal_lm:
        raise ValueError(f"cannot find the backbone of {type(causal_lm).__name__} (no base_model)")
    return base


def hidden_size_of(config: PretrainedConfig) -> int:
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    text = getattr(config, "text_config", None)
    if isinstance(text, PretrainedConfig):
        return hidden_size_of(text)
    raise ValueError(f"cannot read the hidden size from {type(config).__name__}")
