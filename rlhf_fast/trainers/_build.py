"""Model, tokenizer and record loading for the stage trainers, from the typed config sections."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rlhf_fast.config import DataConfig, ModelConfig
from rlhf_fast.data import load_records, prepare_tokenizer
from rlhf_fast.data.chat import check_records


def get_task(data: DataConfig):
    from rlhf_fast.tasks import get_task as _get_task

    return _get_task(data.task)


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def has_tokenizer(path) -> bool:
    """Whether a local directory holds a saved tokenizer (``tokenizer.save_pretrained``)."""
    return path is not None and any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def _auto_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"the tokenizer in {str(path)!r} cannot be loaded ({type(e).__name__}: {e})") from None


def load_tokenizer(model: ModelConfig, data: DataConfig, *, source: Optional[str] = None, section: str = "model"):
    """The tokenizer for a stage, prepared for RLHF (dedicated pad, left padding):
    ``model.tokenizer_path`` when set, else the model directory's own (``source`` / ``model.path``),
    else, for a fresh built-in model (no directory), the built-in task's. A model directory without
    a tokenizer and no ``tokenizer_path`` is a ValueError: the built-in tokenizer's ids would be
    wrong for a real model. ``section`` names the config section in errors ("sft.model", "ppo.policy")."""
    if model.tokenizer_path is not None:
        if not has_tokenizer(model.tokenizer_path):
            raise ValueError(f"{section}.tokenizer_path {model.tokenizer_path!r} is not a tokenizer directory "
                             f"(no {' / '.join(TOKENIZER_FILES)})")
        tok = _auto_tokenizer(model.tokenizer_path)
        own_dir = source or model.path
        if own_dir is not None and has_tokenizer(own_dir):  # the model directory's own tokenizer must agree
            from rlhf_fast.models.loading import tokenizer_disagreement

            differ = tokenizer_disagreement(_auto_tokenizer(own_dir), tok)
            if differ:
                raise ValueError(
                    f"{section}.tokenizer_path {model.tokenizer_path!r} ({len(tok)} tokens) disagrees with the "
                    f"tokenizer saved in the model directory {own_dir!r} on {len(differ)} tokens (e.g. {differ[0]!r}): "
                    "the model would read wrong ids; drop tokenizer_path, or give one that extends the model's")
    elif (path := source or model.path) is not None:
        if not Path(path).is_dir():
            raise ValueError(f"model path {path!r} is not a directory (rlhf_fast never downloads models)")
        if not has_tokenizer(path):
            raise ValueError(f"model directory {path!r} holds no tokenizer (no {' / '.join(TOKENIZER_FILES)}): save "
                             f"the model's tokenizer there (tokenizer.save_pretrained) or set {section}.tokenizer_path")
        tok = _auto_tokenizer(path)
    else:
        tok = get_task(data).tokenizer
    return prepare_tokenizer(tok)


def model_source(model: ModelConfig, data: DataConfig, tokenizer, path: Optional[str] = None):
    """A local directory to load from, or a fresh config of ``model.arch`` / ``model.size``."""
    path = path or model.path
    if path is not None:
        if not Path(path).is_dir():
            raise ValueError(f"model path {path!r} is not a directory (rlhf_fast never downloads models)")
        return path
    from rlhf_fast.tasks import tiny_config

    return tiny_config(model.arch, tokenizer=tokenizer, size=model.size, **model.config_overrides)


def _check_file(path: str, what: str) -> str:
    if not Path(path).exists():
        raise ValueError(f"{what}: {path!r} does not exist (a JSONL file or a local datasets directory)")
    return path


# what each stage reads from a record (rlhf_fast.data.chat.parts_of)
DATA_KINDS = {"sft": "sft", "rm": "preference", "ppo": "prompt"}


def record_fields(data: DataConfig) -> dict:
    """The record field names of ``data``, as ``rlhf_fast.data.chat.parts_of`` takes them."""
    return dict(prompt_field=data.prompt_field, response_field=data.response_field, chosen_field=data.chosen_field,
                rejected_field=data.rejected_field, messages_field=data.messages_field)


def check_data_files(data: DataConfig, stage: str) -> None:
    """Fails fast, before any distributed set-up or model, on data files that do not exist, hold no
    records, or hold a record the stage cannot read (a missing field, a wrong type, a malformed
    message list: the error names the file and line). Tokenisation (lengths, chat templates)
    needs the tokenizer and is checked when the datasets are built."""
    for name in ("train_file", "eval_file"):
        if getattr(data, name) is not None:
            check_records(file_records(getattr(data, name), f"{stage}.data.{name}"), DATA_KINDS[stage],
                          **record_fields(data))


def file_records(path: str, what: str) -> list:
    """The records of a data file (``what``: its config field, for the errors); never empty."""
    records = load_records(_check_file(path, what))
    if not records:
        raise ValueError(f"{what} {str(path)!r} holds no records")
    return records


def split_records(data: DataConfig, stage: str, task_records) -> tuple[list, list]:
    """(train, eval) records: from ``data.train_file`` / ``data.eval_file`` or, without a train
    file, from ``task_records()`` (the built-in task); without an eval file the last
    ``eval_fraction`` of the training records are held out."""
    if data.train_file is not None:
        train = file_records(data.train_file, f"{stage}.data.train_file")
    else:
        train = list(task_records())
    if data.eval_file is not None:
        evals = file_records(data.eval_file, f"{stage}.data.eval_file")
    else:
        n_eval = int(round(len(train) * data.eval_fraction))
        train, evals = (train[:-n_eval], train[-n_eval:]) if n_eval else (train, [])
    if data.max_train_examples is not None:
        train = train[: data.max_train_examples]
    if data.max_eval_examples is not None:
        evals = evals[: data.max_eval_examples]
    if not train:
        raise ValueError(f"{stage}.data: no training records")
    if not evals:
        raise ValueError(f"{stage}.data: no held-out records (set eval_file or eval_fraction > 0)")
    return train, evals
