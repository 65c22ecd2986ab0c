"""A byte-level BPE tokenizer trained locally with the ``tokenizers`` library and cached on disk.

GPT-2 style: byte-level pre-tokenisation (any text encodes, nothing is ever unknown),
"<|endoftext|>" as BOS and EOS, plus a dedicated "[PAD]" (never EOS: N details #2). Training is
single-pass and deterministic for a given corpus; the cache directory is keyed by a hash of
everything that shapes the tokenizer, and written atomically (a temporary directory renamed into
place) so concurrent processes never read a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Sequence

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "[PAD]"


def default_cache_dir() -> Path:
    """``$RLHF_FAST_CACHE`` or ``~/.cache/rlhf_fast``."""
    root = os.environ.get("RLHF_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rlhf_fast")
    return Path(root)


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, extra_tokens: Sequence[str] = ()):
    """A ``PreTrainedTokenizerFast`` trained on ``texts`` (special tokens included in ``vocab_size``).
    ``extra_tokens``: strings added after training as single tokens (ids ``vocab_size`` on), matched
    in text before the byte-level split and kept by ``decode(skip_special_tokens=True)`` (not special):
    a tool call's markers such as ``"<calc>"``, so one id can end a model turn."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if extra_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def load_or_train_tokenizer(directory: Path, texts: Callable[[], Sequence[str]], vocab_size: int,
                            extra_tokens: Sequence[str] = ()):
    """Loads the tokenizer cached in ``directory``, or trains it on ``texts()`` (plus
    ``extra_tokens``, see ``train_bpe_tokenizer``) and caches it."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        tokenizer = train_bpe_tokenizer(texts(), vocab_size, extra_tokens)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}-"))
        try:
            tokenizer.save_pretrained(str(tmp))
            try:
                os.replace(tmp, directory)
            except OSError:  # another process won the race (directory exists and is not empty)
                if not (directory / "tokenizer.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    tokenizer.padding_side = "left"
    return tokenizer
