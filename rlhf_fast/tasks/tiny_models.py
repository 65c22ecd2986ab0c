"""Tiny model configs in four architecture styles: GPT-2, Llama, GPT-NeoX (Pythia) and Qwen2.

``size="test"`` is for unit tests (a few thousand parameters besides the embeddings);
``size="task"`` is the built-in task's model (about 3.5 M parameters with a 1k vocabulary: it
learns the task in minutes on 2 CPU cores). The vocabulary size and special-token ids come from a
tokenizer when one is given. Dropout is 0 in every config (N details #13).
"""

from __future__ import annotations

from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, PretrainedConfig, Qwen2Config

ARCHITECTURES = ("gpt2", "llama", "gpt_neox", "qwen2")

# hidden, layers, heads, kv heads, mlp, max positions
_SIZES = {
    "test": dict(hidden=32, layers=2, heads=4, kv_heads=2, mlp=64, positions=128),
    "task": dict(hidden=256, layers=4, heads=4, kv_heads=4, mlp=768, positions=256),
}


def _special_ids(tokenizer, vocab_size):
    if tokenizer is None:
        return dict(bos_token_id=None, eos_token_id=None, pad_token_id=None), vocab_size
    return (
        dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        len(tokenizer),
    )


def tiny_config(
    arch: str = "gpt2",
    *,
    tokenizer=None,
    vocab_size: int | None = None,
    size: str = "test",
    **overrides,
) -> PretrainedConfig:
    """A small config of the given architecture style.

    ``arch``: one of ``ARCHITECTURES``. ``tokenizer``: supplies ``len(tokenizer)`` as the vocab
    size and the bos / eos / pad ids; otherwise ``vocab_size`` is required. ``size``: "test" or
    "task". ``overrides``: any config field of that architecture.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if size not in _SIZES:
        raise ValueError(f"size must be one of {tuple(_SIZES)}, got {size!r}")
    if tokenizer is None and vocab_size is None:
        raise ValueError("tiny_config needs a tokenizer or a vocab_size")
    ids, vocab = _special_ids(tokenizer, vocab_size)
    if vocab_size is not None:
        vocab = vocab_size
    s = _SIZES[size]
    if arch == "gpt2":
        kw = dict(
            vocab_size=vocab, n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], n_inner=s["mlp"],
            n_positions=s["positions"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            summary_first_dropout=0.0, tie_word_embeddings=True,
        )
        cls = GPT2Config
    elif arch == "llama":
        kw = dict(
            vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], intermediate_size=s["mlp"],
            max_position_embeddings=s["positions"], attention_dropout=0.0, tie_word_embeddings=False,
        )
        cls = LlamaConfig
    elif arch == "gpt_neox":
        kw = dict(
            vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], intermediate_size=s["mlp"], max_position_embeddings=s["positions"],
            attention_dropout=0.0, hidden_dropout=0.0, classifier_dropout=0.0, use_parallel_residual=True,
            tie_word_embeddings=False,
        )
        cls = GPTNeoXConfig
    else:
        kw = dict(
            vocab_size=vocab, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], intermediate_size=s["mlp"],
            max_position_embeddings=s["positions"], attention_dropout=0.0, tie_word_embeddings=True,
        )
        cls = Qwen2Config
    kw.update({k: v for k, v in ids.items() if v is not None})
    kw.update(overrides)
    return cls(**kw)


def tiny_gpt2_config(**kw) -> GPT2Config:
    return tiny_config("gpt2", **kw)


def tiny_llama_config(**kw) -> LlamaConfig:
    return tiny_config("llama", **kw)


def tiny_neox_config(**kw) -> GPTNeoXConfig:
    return tiny_config("gpt_neox", **kw)


def tiny_qwen2_config(**kw) -> Qwen2Config:
    return tiny_config("qwen2", **kw)
