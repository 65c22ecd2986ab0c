"""Chat-style records (TRL's conversational formats) for SFT, preference and prompt data, rendered
with the tokenizer's chat template, the plain fallback without one, the errors for records that
cannot be read, and data validated (file and line named) before any distributed set-up or model."""

from __future__ import annotations

import pytest
import torch

from rlhf_fast import config as C
from rlhf_fast.data import IGNORE_INDEX, PreferenceDataset, PromptDataset, SFTDataset, write_jsonl
from rlhf_fast.tasks.tokenizer import train_bpe_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

SYSTEM = {"role": "system", "content": "be kind"}
USER = {"role": "user", "content": "how is the cat"}
ANSWER = {"role": "assistant", "content": "the cat sat on a mat"}
WORSE = {"role": "assistant", "content": "no"}


def _tokenizer(template=CHATML):
    tok = train_bpe_tokenizer(["how is the cat", "the cat sat on a mat", "be kind no yes"] * 5, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if template is not None:
        tok.eos_token = "<|im_end|>"  # as chat models: the turn's end is EOS
        tok.chat_template = template
    return tok


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_sft_messages_rendered_with_the_chat_template():
    tok = _tokenizer()
    ds = SFTDataset([{"messages": [SYSTEM, USER, ANSWER]}], tok)
    prompt = tok.apply_chat_template([SYSTEM, USER], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    p = enc(tok, prompt)
    want = p + enc(tok, "the cat sat on a mat") + [tok.eos_token_id]  # the template's EOS, kept once
    item = ds[0]
    assert item["input_ids"].tolist() == want
    assert item["labels"].tolist() == [IGNORE_INDEX] * len(p) + want[len(p):]
    # the whole sequence is the conversation's own rendering (up to the template's trailing newline)
    full = tok.apply_chat_template([SYSTEM, USER, ANSWER], tokenize=False)
    assert tok.decode(item["input_ids"]) == full.rstrip("\n")
    # TRL's prompt-completion form gives the same item
    again = SFTDataset([{"prompt": [SYSTEM, USER], "completion": [ANSWER]}], tok, response_field="completion")
    assert torch.equal(again[0]["input_ids"], item["input_ids"]) and torch.equal(again[0]["labels"], item["labels"])


def test_preference_and_prompt_messages():
    tok = _tokenizer()
    explicit = PreferenceDataset([{"prompt": [USER], "chosen": [ANSWER], "rejected": [WORSE]}], tok)
    implicit = PreferenceDataset([{"chosen": [USER, ANSWER], "rejected": [USER, WORSE]}], tok)  # TRL's implicit prompt
    p = enc(tok, tok.apply_chat_template([USER], tokenize=False, add_generation_prompt=True))
    for ds in (explicit, implicit):
        item = ds[0]
        assert item["prompt_length"] == len(p)
        assert item["chosen_input_ids"].tolist() == p + enc(tok, "the cat sat on a mat") + [tok.eos_token_id]
        assert item["rejected_input_ids"].tolist() == p + enc(tok, "no") + [tok.eos_token_id]
        assert ds.prompt_ids[0] == p
    prompts = PromptDataset([{"messages": [SYSTEM, USER]}, {"prompt": [USER]}, {"prompt": "plain text"}], tok)
    assert prompts.input_ids[0].tolist() == enc(tok, tok.apply_chat_template([SYSTEM, USER], tokenize=False,
                                                                             add_generation_prompt=True))
    assert prompts.input_ids[1].tolist() == p and prompts.prompts[1].endswith("<|im_start|>assistant\n")
    assert prompts.prompts[2] == "plain text"


def test_without_a_chat_template():
    tok = _tokenizer(template=None)
    # one user message answered by one assistant message: the plain rendering is well defined
    chat = SFTDataset([{"messages": [USER, ANSWER]}], tok)
    text = SFTDataset([{"prompt": USER["content"], "response": ANSWER["content"]}], tok)
    assert torch.equal(chat[0]["input_ids"], text[0]["input_ids"])
    assert PromptDataset([{"prompt": [USER]}], tok).prompts == [USER["content"]]
    # anything else is an error naming the record
    with pytest.raises(ValueError, match=r"record 0: the tokenizer has no chat template, and a prompt of messages "
                                         r"\['system', 'user'\] has no plain rendering"):
        SFTDataset([{"messages": [SYSTEM, USER, ANSWER]}], tok)
    with pytest.raises(ValueError, match=r"record 0: the tokenizer has no chat template, and a prompt of messages "
                                         r"\['user', 'assistant', 'user'\]"):
        PromptDataset([{"messages": [USER, ANSWER, USER]}], tok)


@pytest.mark.parametrize("kind, record, match", [
    ("sft", {"messages": [USER, {"role": "user"}]}, r"field 'messages': message 1 must be a dict with 'role' and "
                                                    r"'content', got \['role'\]"),
    ("sft", {"messages": [USER, {"role": "assistant", "content": [{"type": "image"}]}]},
     r"field 'messages': message 1 has content of type list; only text"),
    ("sft", {"messages": [SYSTEM, USER]}, r"field 'messages' must end with an assistant message \(the response\), "
                                          r"it ends with a 'user' one"),
    ("sft", {"messages": [ANSWER]}, r"field 'messages' holds only the response; it needs the prompt's messages"),
    ("sft", {"messages": []}, r"field 'messages' must be a non-empty list"),
    ("sft", {"response": [ANSWER]}, r"missing field 'prompt': a message-list 'response' needs the prompt's messages"),
    ("pref", {"chosen": [USER, ANSWER], "rejected": [SYSTEM, USER, WORSE]},
     r"no prompt: field 'prompt' is missing and 'chosen' and 'rejected' do not share the messages"),
    ("pref", {"prompt": "x", "chosen": [USER, ANSWER], "rejected": "no"},
     r"fields \('chosen', 'rejected'\) mix text and message lists"),
    ("pref", {"prompt": "x", "chosen": [USER, ANSWER], "rejected": [USER, WORSE]},
     r"field 'prompt' must be a message list when 'chosen' is one"),
    ("prompt", {"messages": [USER, ANSWER]}, r"field 'messages' ends with an assistant message"),
    ("prompt", {"text": "hi"}, r"missing field 'prompt' \(fields present: 'text'\)"),
])
def test_bad_chat_records_name_file_line_and_field(tmp_path, kind, record, match):
    tok = _tokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    cls = {"sft": SFTDataset, "pref": PreferenceDataset, "prompt": PromptDataset}[kind]
    with pytest.raises(ValueError, match=r"d\.jsonl line 1: " + match):
        cls(path, tok)


# ---- validated before any distributed set-up or model ----------------------------------------------


def _lines(n_good, bad, *, good):
    return [good] * n_good + [bad]


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_data_errors_before_distributed_setup_and_models(tmp_path, monkeypatch, stage):
    """A bad record at line 21 used to surface after DeepSpeed and the models were set up (minutes on
    a loaded box); it must fail first, naming file, line and field."""
    from rlhf_fast.trainers import deepspeed_setup as dss

    monkeypatch.setattr(dss, "init_distributed", lambda *a, **k: pytest.fail("distributed set-up before the data check"))
    good = {"sft": {"prompt": "a", "response": "b"}, "rm": {"prompt": "a", "chosen": "b", "rejected": "c"},
            "ppo": {"prompt": "a"}}[stage]
    bad = {k: v for k, v in good.items() if k != "prompt"} | {"messages": "not a list"}
    f = write_jsonl(tmp_path / "train.jsonl", _lines(20, bad, good=good))
    cfg = C.load_config(overrides=[f"--{stage}.data.train_file", str(f), "--rm.normalization", "none",
                                   "--ppo.reward.function", "task:gold"])
    if stage == "sft":
        from rlhf_fast.trainers.sft import SFTTrainer as T
    elif stage == "rm":
        from rlhf_fast.trainers.rm import RMTrainer as T

        cfg.rm.sft_model = str(tmp_path)  # any directory: the data check comes first
    else:
        from rlhf_fast.trainers.ppo import PPOTrainer as T
    match = r"train\.jsonl line 21: missing field 'prompt'" if stage != "ppo" else \
        r"train\.jsonl line 21: field 'messages' must be a non-empty list"
    with pytest.raises(ValueError, match=match):
        T(getattr(cfg, stage), tmp_path / "out")
    assert not (tmp_path / "out").exists()
