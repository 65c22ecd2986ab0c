"""rlhf_fast.data: JSONL and local HF datasets, field names, truncation, left padding and position
ids, collators, pad-token handling, and the errors bad input must raise."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_fast.data import (
    IGNORE_INDEX,
    PreferenceDataset,
    PromptDataset,
    SFTDataset,
    left_pad,
    load_records,
    position_ids_from_mask,
    prepare_tokenizer,
    write_jsonl,
)

WORDS = ["<eos>", "[PAD]", "<unk>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "."]


def word_tokenizer(*, eos="<eos>", pad="[PAD]") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer built in memory (ids = positions in WORDS)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"unk_token": "<unk>"}
    if eos:
        kwargs["eos_token"] = eos
    if pad:
        kwargs["pad_token"] = pad
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def ids_of(text):
    return [WORDS.index(w) for w in text.split()]


@pytest.fixture
def tok():
    return word_tokenizer()


# ---- sources -------------------------------------------------------------------------------------

def test_prompts_from_jsonl_with_custom_field_left_padded(tmp_path, tok):
    path = write_jsonl(tmp_path / "q.jsonl", [{"query": "the cat"}, {"query": "the dog ran far away"}, {"query": "a mat"}])
    ds = PromptDataset(path, tok, prompt_field="query")
    assert len(ds) == 3 and ds.prompts[1] == "the dog ran far away"
    batch = ds.collator()([ds[0], ds[1]])
    pad = tok.pad_token_id
    assert batch["input_ids"].tolist() == [[pad, pad, pad] + ids_of("the cat"), ids_of("the dog ran far away")]
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1, 1], [1] * 5]
    assert batch["position_ids"].tolist() == [[0, 0, 0, 0, 1], [0, 1, 2, 3, 4]]
    assert batch["index"].tolist() == [0, 1]
    fixed = ds.collator(pad_to_length=8)([ds[0], ds[2]])  # N details #2: fixed query length
    assert fixed["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="fixed length 3"):
        ds.collator(pad_to_length=3)([ds[1]])


def test_hf_datasets_directories(tmp_path, tok):
    rows = [{"prompt": "the cat", "chosen": "sat on a mat .", "rejected": "ran ."}] * 3
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
                         ).save_to_disk(str(tmp_path / "dict"))
    assert len(PreferenceDataset(tmp_path / "single", tok)) == 3
    assert len(PreferenceDataset(tmp_path / "dict", tok, split="test")) == 1
    with pytest.raises(ValueError, match="pass split="):
        load_records(tmp_path / "dict")
    with pytest.raises(ValueError, match="no split 'valid'"):
        load_records(tmp_path / "dict", split="valid")
    bad = [{"prompt": "the cat", "chosen": "sat ."}]
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"bad row 0: missing field 'rejected'"):
        PreferenceDataset(tmp_path / "bad", tok)


def test_sft_labels_mask_prompt_and_padding(tok):
    ds = SFTDataset([{"p": "the cat", "r": "sat on a mat ."}, {"p": "a dog", "r": "ran ."}], tok,
                    prompt_field="p", response_field="r")
    eos = tok.eos_token_id
    assert ds[0]["input_ids"].tolist() == ids_of("the cat sat on a mat .") + [eos]
    assert ds[0]["labels"].tolist() == [IGNORE_INDEX] * 2 + ids_of("sat on a mat .") + [eos]
    batch = ds.collator()([ds[0], ds[1]])
    # Row 1 is 5 tokens in a batch of 8: 3 pads, then 2 prompt tokens, all ignored.
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 5 + ids_of("ran .") + [eos]
    assert batch["attention_mask"][1].tolist() == [0] * 3 + [1] * 5
    full = SFTDataset([{"prompt": "the cat", "response": "sat ."}], tok, train_on_prompt=True)
    assert full[0]["labels"].tolist() == full[0]["input_ids"].tolist()
    cut = SFTDataset([{"prompt": "the cat", "response": "sat on a mat ."}], tok, max_response_length=3)
    assert cut[0]["input_ids"].tolist() == ids_of("the cat sat on a")  # cut short: no EOS


def test_preference_collator_stacks_chosen_then_rejected(tok):
    ds = PreferenceDataset([{"prompt": "the cat", "chosen": "sat on a mat .", "rejected": "ran ."}] * 2, tok)
    batch = ds.collator()([ds[0], ds[1]])
    assert batch["num_pairs"] == 2 and batch["input_ids"].shape == (4, 8)
    eos = tok.eos_token_id
    assert batch["input_ids"][0].tolist() == ids_of("the cat sat on a mat .") + [eos]
    assert batch["input_ids"][2].tolist()[-5:] == ids_of("the cat ran .") + [eos]
    assert batch["attention_mask"][2].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert ds[0]["prompt_length"] == 2


# ---- truncation ----------------------------------------------------------------------------------

def test_query_truncation_sides(tok):
    rec = [{"prompt": "the dog ran far away"}]
    assert PromptDataset(rec, tok, max_prompt_length=2)[0]["input_ids"].tolist() == ids_of("far away")
    assert PromptDataset(rec, tok, max_prompt_length=2, truncation="right")[0]["input_ids"].tolist() == ids_of("the dog")
    with pytest.raises(ValueError, match="truncation must be one of"):
        PromptDataset(rec, tok, max_prompt_length=2, truncation="middle")


# ---- pad token -----------------------------------------------------------------------------------

def test_prepare_tokenizer_adds_a_pad_distinct_from_eos():
    no_pad = word_tokenizer(pad=None)
    n = len(no_pad)
    prepare_tokenizer(no_pad)
    assert no_pad.pad_token == "[PAD]" and no_pad.pad_token_id != no_pad.eos_token_id
    assert no_pad.padding_side == "left" and len(no_pad) == n  # "[PAD]" was already a word here

    eos_as_pad = word_tokenizer(pad="<eos>")
    prepare_tokenizer(eos_as_pad, pad_token="<pad2>")
    assert eos_as_pad.pad_token == "<pad2>" and len(eos_as_pad) == len(WORDS) + 1  # resize the model!

    fine = word_tokenizer()
    prepare_tokenizer(fine)
    assert fine.pad_token_id == WORDS.index("[PAD]")


# ---- padding properties --------------------------------------------------------------------------

@given(st.lists(st.lists(st.integers(1, 50), max_size=9), min_size=1, max_size=6), st.integers(0, 3))
def test_left_pad_round_trip_and_positions(seqs, extra):
    L = max(len(s) for s in seqs) + extra
    ids, mask = left_pad(seqs, 0, length=L)
    pos = position_ids_from_mask(mask)
    assert ids.shape == mask.shape == (len(seqs), L)
    for b, s in enumerate(seqs):
        assert ids[b][mask[b].bool()].tolist() == s  # unpadding recovers the sequence
        assert mask[b].tolist() == [0] * (L - len(s)) + [1] * len(s)  # padding is on the left
        assert pos[b, L - len(s):].tolist() == list(range(len(s)))  # positions start at 0
    rounded, _ = left_pad(seqs, 0, pad_to_multiple_of=4)
    assert rounded.shape[1] % 4 == 0 and rounded.shape[1] >= max(len(s) for s in seqs)


# ---- bad input -----------------------------------------------------------------------------------

def _jsonl(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_missing_field_names_file_line_and_field(tmp_path, tok):
    path = _jsonl(tmp_path, [json.dumps({"prompt": "the cat", "response": "sat ."}), json.dumps({"prompt": "a dog"})])
    with pytest.raises(ValueError, match=r"data\.jsonl line 2: missing field 'response' \(fields present: 'prompt'\)"):
        SFTDataset(path, tok)


def test_empty_prompt(tmp_path, tok):
    path = _jsonl(tmp_path, [json.dumps({"prompt": "the cat"}), "", json.dumps({"prompt": "   "})])
    with pytest.raises(ValueError, match=r"data\.jsonl line 3: field 'prompt' is empty"):
        PromptDataset(path, tok)


def test_prompt_too_long_with_truncation_off(tmp_path, tok):
    path = _jsonl(tmp_path, [json.dumps({"prompt": "the dog ran far away"})])
    with pytest.raises(ValueError, match=r"data\.jsonl line 1: field 'prompt' has 5 tokens, more than the limit 3, "
                                         r"and truncation is off"):
        PromptDataset(path, tok, max_prompt_length=3, truncation=None)


def test_tokenizer_without_eos():
    with pytest.raises(ValueError, match="no EOS token"):
        PromptDataset([{"prompt": "the cat"}], word_tokenizer(eos=None))


def test_other_bad_records(tmp_path, tok):
    with pytest.raises(ValueError, match=r"data\.jsonl line 2: invalid JSON"):
        PromptDataset(_jsonl(tmp_path, [json.dumps({"prompt": "a"}), "{not json"]), tok)
    with pytest.raises(ValueError, match=r"line 1: expected a JSON object"):
        PromptDataset(_jsonl(tmp_path, ["[1, 2]"]), tok)
    with pytest.raises(ValueError, match=r"record 0: field 'prompt' must be a string, got int"):
        PromptDataset([{"prompt": 3}], tok)
    with pytest.raises(ValueError, match="neither a JSONL file nor a local datasets directory"):
        PromptDataset(tmp_path / "missing.jsonl", tok)
    with pytest.raises(ValueError, match="is empty"):
        PromptDataset(_jsonl(tmp_path, [""]), tok)
