"""A user's own models: Hugging Face sequence-classification reward models load with their trained
head and score exactly as transformers does; a directory without a trained reward head, a
sequence classifier loaded as a policy, weights left at random init and a tokenizer of another
model are errors naming what was found (each used to pass silently)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from rlhf_fast.config import DataConfig, ModelConfig
from rlhf_fast.models import (
    Critic,
    Policy,
    RewardModel,
    check_reward_tokenizer,
    load_backbone,
    load_causal_lm,
    load_reward_model,
)
from rlhf_fast.tasks import ARCHITECTURES, tiny_config
from rlhf_fast.tasks.tokenizer import train_bpe_tokenizer
from rlhf_fast.trainers import _build

V = 61
PAD = 0


def _hf_rm_dir(tmp_path, arch, *, name="hf_rm", pad=PAD, **overrides):
    """An ``AutoModelForSequenceClassification`` reward model (num_labels 1) saved the usual way,
    with a non-trivial score head; returns (directory, the HF model)."""
    overrides = {"vocab_size": V, "num_labels": 1, **overrides}
    cfg = tiny_config(arch, pad_token_id=pad, **overrides)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    d = tmp_path / name
    model.save_pretrained(d)
    return d, model


def _rows(seed=3, lengths=(3, 7, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]


def _left_pad(rows, L, pad=PAD):
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = r
        mask[b, L - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_sequence_classifier_scores_equal_transformers(arch, tmp_path):
    d, hf = _hf_rm_dir(tmp_path, arch)
    rm = RewardModel.from_pretrained(d).eval()
    assert rm.normalization["source"] == "hf_sequence_classification" and float(rm.gain) == 1 and float(rm.bias) == 0
    rows = _rows()
    with torch.no_grad():
        want = torch.stack([hf(input_ids=r[None]).logits[0, 0] for r in rows])  # the HF model's own output
        got = rm(*_left_pad(rows, 9))
    torch.testing.assert_close(got.raw_scores, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got.scores, want, atol=2e-5, rtol=1e-4)
    # The critic started from the reward model (N+, PPO-max) gets the trained head too.
    critic = Critic.from_pretrained(d).eval()
    with torch.no_grad():
        torch.testing.assert_close(critic(*_left_pad(rows, 9)).values[:, -1], want, atol=2e-5, rtol=1e-4)


def test_score_read_where_transformers_reads_it_when_pad_is_eos(tmp_path):
    """transformers reads the last token that is not the config's pad id: with pad == EOS (Qwen's
    <|endoftext|>, TRL's default), a response ending in EOS is scored at the token before it. The
    score must be read there, not at the EOS, or PPO optimises another number than the RM gives."""
    eos = 5
    d, hf = _hf_rm_dir(tmp_path, "qwen2", pad=eos)
    rm = RewardModel.from_pretrained(d).eval()
    assert rm.score_skip_token_id == eos
    rows = [torch.cat([r, torch.tensor([eos])]) for r in _rows(seed=4)]
    rows = [torch.where(r[:-1] == eos, 6, r[:-1]) for r in rows]  # no EOS inside the text
    rows = [torch.cat([r, torch.tensor([eos])]) for r in rows]
    with torch.no_grad():
        want = torch.stack([hf(input_ids=r[None]).logits[0, 0] for r in rows])
        got = rm(*_left_pad(rows, 10, pad=1)).raw_scores  # our pad id differs from the RM's config
        at_eos = rm.forward(*_left_pad(rows, 10, pad=1)).rewards[:, -1]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(at_eos, want)  # reading at the EOS would give other numbers
    # the reading rule survives a save in rlhf_fast's format
    rm.save_pretrained(tmp_path / "ours")
    again = RewardModel.from_pretrained(tmp_path / "ours").eval()
    assert again.score_skip_token_id == eos
    with torch.no_grad():
        torch.testing.assert_close(again(*_left_pad(rows, 10, pad=1)).raw_scores, want, atol=2e-5, rtol=1e-4)


def test_directories_without_a_trained_reward_head_are_errors(tmp_path):
    # a causal LM (an SFT directory) used to get a fresh random head, silently
    cfg = tiny_config("qwen2", vocab_size=V)
    load_causal_lm(cfg, seed=0).save_pretrained(tmp_path / "causal")
    with pytest.raises(ValueError, match=r"causal holds no trained reward head: it holds Qwen2ForCausalLM"):
        RewardModel.from_pretrained(tmp_path / "causal")
    Policy.from_pretrained(cfg, seed=0).save_pretrained(tmp_path / "sft")
    with pytest.raises(ValueError, match=r"holds Qwen2ForCausalLM \(saved by rlhf_fast as a policy\)"):
        RewardModel.from_pretrained(tmp_path / "sft")
    with pytest.raises(ValueError, match="holds no trained reward head; pass new_head=True"):
        RewardModel.from_pretrained(cfg)
    assert RewardModel.from_pretrained(tmp_path / "sft", new_head=True, seed=0) is not None  # RM training's start
    # a classifier with two labels
    d2, _ = _hf_rm_dir(tmp_path, "llama", name="two", num_labels=2)
    with pytest.raises(ValueError, match=r"LlamaForSequenceClassification with num_labels = 2; a reward model scores "
                                         r"with one label"):
        RewardModel.from_pretrained(d2)
    # a classifier whose score weights are missing from the file
    d3, _ = _hf_rm_dir(tmp_path, "gpt2", name="noscore")
    f = d3 / "model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if not k.startswith("score.")}, str(f),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"leaves missing weights score\.weight, which would be drawn at random; the "
                                         r"directory holds GPT2ForSequenceClassification"):
        RewardModel.from_pretrained(d3)
    # a classifier whose weights file is gone
    (d3 / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"noscore: cannot load the weights \(.*no file named model\.safetensors"):
        RewardModel.from_pretrained(d3)
    # rlhf_fast's format with its heads file gone
    d4 = tmp_path / "ours"
    RewardModel.from_pretrained(cfg, new_head=True, seed=0).save_pretrained(d4)
    (d4 / "rlhf_fast_heads.safetensors").unlink()
    with pytest.raises(ValueError, match=r"rlhf_fast\.json says it holds a reward_model, but "
                                         r"rlhf_fast_heads\.safetensors is missing"):
        RewardModel.from_pretrained(d4)
    # a directory that is not there
    with pytest.raises(ValueError, match="not a local directory"):
        RewardModel.from_pretrained(tmp_path / "nope")


def test_reward_model_is_not_a_policy_and_missing_weights_are_errors(tmp_path):
    d, _ = _hf_rm_dir(tmp_path, "qwen2")
    with pytest.raises(ValueError, match=r"holds a sequence-classification model \(Qwen2ForSequenceClassification\), "
                                         r"not a causal LM"):
        Policy.from_pretrained(d)
    # an untied causal LM whose lm_head is missing from the file: transformers would draw it
    cfg = tiny_config("llama", vocab_size=V)
    load_causal_lm(cfg, seed=0).save_pretrained(tmp_path / "llama")
    f = tmp_path / "llama" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if k != "lm_head.weight"}, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"as LlamaForCausalLM leaves missing weights lm_head\.weight"):
        load_causal_lm(tmp_path / "llama")
    load_backbone(tmp_path / "llama")  # the body alone is complete


# ---- tokenizers --------------------------------------------------------------------------------------------


def _tokenizer(texts=("a small corpus of words", "and some more words here", "the reward model reads text")):
    return train_bpe_tokenizer(list(texts) * 4, vocab_size=300)


def test_model_directory_without_tokenizer_is_an_error(tmp_path):
    """It used to get the built-in 631-token tokenizer silently (and the vocabulary was grown to fit)."""
    load_causal_lm(tiny_config("qwen2", vocab_size=V), seed=0).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"model directory '.*m' holds no tokenizer .* set sft\.model\.tokenizer_path"):
        _build.load_tokenizer(ModelConfig(path=str(tmp_path / "m")), DataConfig(), section="sft.model")
    with pytest.raises(ValueError, match=r"ppo\.policy\.tokenizer_path '.*m' is not a tokenizer directory"):
        _build.load_tokenizer(ModelConfig(tokenizer_path=str(tmp_path / "m")), DataConfig(), section="ppo.policy")
    tok = _tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    got = _build.load_tokenizer(ModelConfig(path=str(tmp_path / "m"), tokenizer_path=str(tmp_path / "tok")), DataConfig())
    assert got.get_vocab() == tok.get_vocab() | {"[PAD]": got.pad_token_id} or got.get_vocab()["[PAD]"] == got.pad_token_id
    # a fresh built-in model (no directory) still gets the built-in task's tokenizer
    assert len(_build.load_tokenizer(ModelConfig(), DataConfig())) > 0


def test_reward_tokenizer_checked_against_the_policy(tmp_path):
    tok = _tokenizer()
    size = len(tok)
    d, _ = _hf_rm_dir(tmp_path, "qwen2", vocab_size=size, name="rm_exact")
    tok.save_pretrained(d)
    rm = load_reward_model(d, tok)  # the same tokenizer: fine
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    # the policy's tokenizer got a new pad past the reward model's embedding: masked, never read
    from rlhf_fast.data import prepare_tokenizer

    tok.pad_token = None
    prepared = prepare_tokenizer(tok, pad_token="<pad>")
    assert len(prepared) == size + 1 and prepared.pad_token_id == size
    check_reward_tokenizer(rm, prepared, d)
    ids = torch.tensor([[prepared.pad_token_id, 7, 8, 9]])
    with torch.no_grad():  # the pad id has no row in the RM: it must not be looked up
        rm(ids, torch.tensor([[0, 1, 1, 1]]))
    # a tokenizer of another model, larger than the embedding: named, with both sizes
    import random

    rng = random.Random(0)
    corpus = [" ".join("".join(rng.choice("qxzjkvw") for _ in range(5)) for _ in range(20)) for _ in range(50)]
    other = train_bpe_tokenizer(corpus, vocab_size=size + 30)
    assert len(other) == size + 30
    with pytest.raises(ValueError, match=rf"the tokenizer has {len(other)} tokens but the model's embedding has "
                                         rf"{size} rows"):
        load_reward_model(d, other)
    # one that fits in the embedding but maps tokens to other ids than the RM's own tokenizer
    d2, _ = _hf_rm_dir(tmp_path, "qwen2", vocab_size=size + 100, name="rm_wide")
    tok.save_pretrained(d2)
    with pytest.raises(ValueError, match=rf"its tokenizer \({size + 1} tokens\) and the policy's \({len(other)} tokens\) "
                                         r"disagree on \d+ tokens"):
        load_reward_model(d2, other)


def test_saved_heads_are_never_dropped_silently(tmp_path):
    """rlhf_fast's own directories: a value head or critic head whose file is gone, or a heads file
    without the metadata naming it, used to load as a plain model (heads dropped or zeroed)."""
    cfg = tiny_config("gpt2", vocab_size=V)
    policy = Policy.from_pretrained(cfg, seed=0, value_head=True)
    policy.save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "rlhf_fast_heads.safetensors").unlink()
    with pytest.raises(ValueError, match=r"rlhf_fast\.json says it holds a policy with a value head, but "
                                         r"rlhf_fast_heads\.safetensors is missing"):
        Policy.from_pretrained(tmp_path / "p")
    Critic.from_pretrained(cfg, seed=0).save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "rlhf_fast_heads.safetensors").unlink()
    with pytest.raises(ValueError, match=r"says it holds a critic, but rlhf_fast_heads\.safetensors is missing"):
        Critic.from_pretrained(tmp_path / "c")
    RewardModel.from_pretrained(cfg, new_head=True, seed=0).save_pretrained(tmp_path / "r")
    (tmp_path / "r" / "rlhf_fast.json").unlink()
    for cls in (Policy, Critic, RewardModel):
        with pytest.raises(ValueError, match=r"rlhf_fast_heads\.safetensors without rlhf_fast\.json"):
            cls.from_pretrained(tmp_path / "r")
    (tmp_path / "r" / "rlhf_fast.json").write_text(json.dumps({"format_version": 1, "kind": "value_model"}))
    with pytest.raises(ValueError, match=r"kind 'value_model' is not one of"):
        Critic.from_pretrained(tmp_path / "r")


def test_rm_policy_samples_from_a_reward_model_is_refused_up_front(tmp_path, monkeypatch):
    """Continuing RM training from a reward model keeps its head, but "policy_samples" needs a
    policy to sample from: that used to fail only after training, in the normalisation."""
    from rlhf_fast import config as C
    from rlhf_fast.trainers import deepspeed_setup as dss
    from rlhf_fast.trainers.rm import RMTrainer

    monkeypatch.setattr(dss, "init_distributed", lambda *a, **k: pytest.fail("distributed set-up before the check"))
    d, _ = _hf_rm_dir(tmp_path, "gpt2")
    cfg = C.load_config(overrides=["--rm.sft_model", str(d)]).rm
    with pytest.raises(ValueError, match=r"'policy_samples' samples from the initial policy, but .*hf_rm holds a reward "
                                         r"model \(GPT2ForSequenceClassification\), which cannot generate"):
        RMTrainer(cfg, tmp_path / "out")


def test_tokenizer_path_must_agree_with_the_model_directorys_own(tmp_path):
    import random

    own = _tokenizer()
    load_causal_lm(tiny_config("qwen2", vocab_size=len(own)), seed=0).save_pretrained(tmp_path / "m")
    own.save_pretrained(tmp_path / "m")
    rng = random.Random(1)
    other = train_bpe_tokenizer([" ".join("".join(rng.choice("qxzjkvw") for _ in range(5)) for _ in range(20))
                                 for _ in range(50)], vocab_size=len(own))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"sft\.model\.tokenizer_path '.*other' \(\d+ tokens\) disagrees with the "
                                         r"tokenizer saved in the model directory '.*m' on \d+ tokens"):
        _build.load_tokenizer(ModelConfig(path=str(tmp_path / "m"), tokenizer_path=str(tmp_path / "other")),
                              DataConfig(), section="sft.model")
    # one that extends the model's own (added special tokens) is fine
    own.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    own.save_pretrained(tmp_path / "extended")
    tok = _build.load_tokenizer(ModelConfig(path=str(tmp_path / "m"), tokenizer_path=str(tmp_path / "extended")),
                                DataConfig())
    assert "<|im_start|>" in tok.get_vocab()
    # a tokenizer file that cannot be read: one line naming the directory
    (tmp_path / "other" / "tokenizer.json").write_text("{not json")
    (tmp_path / "other" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"the tokenizer in '.*other' cannot be loaded"):
        _build.load_tokenizer(ModelConfig(tokenizer_path=str(tmp_path / "other")), DataConfig())


def test_reward_tokenizer_pads_are_exempt(tmp_path):
    """The RM's own pad ("<pad>", added by its trainer) and the policy's ("<newpad>") share an id: masked,
    never read."""
    from rlhf_fast.data import prepare_tokenizer

    rm_tok = _tokenizer()
    rm_tok.pad_token = None
    rm_tok.add_special_tokens({"pad_token": "<pad>"})
    d, _ = _hf_rm_dir(tmp_path, "llama", vocab_size=len(rm_tok), pad=rm_tok.pad_token_id)
    rm_tok.save_pretrained(d)
    policy_tok = _tokenizer()
    policy_tok.pad_token = None
    policy_tok = prepare_tokenizer(policy_tok, pad_token="<newpad>")  # at the id where the RM has "<pad>"
    assert policy_tok.pad_token_id == rm_tok.pad_token_id
    load_reward_model(d, policy_tok)


def test_encoder_classifier_is_refused(tmp_path):
    """BERT's classifier reads a pooled first token: a per-token head read at the last token would
    give other scores, silently."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                     num_labels=1)
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"BertForSequenceClassification has no per-token `score` layer"):
        RewardModel.from_pretrained(tmp_path / "bert")


def test_rm_training_from_an_hf_reward_model_keeps_its_head(tmp_path):
    """rm.model.path on a TRL-style reward model: training continues from its trained head (and its
    reading rule); it used to start from a fresh random head."""
    from rlhf_fast import config as C
    from rlhf_fast.trainers.rm import RMTrainer

    tok = _tokenizer()
    d, hf = _hf_rm_dir(tmp_path, "qwen2", vocab_size=len(tok), pad=tok.eos_token_id)
    tok.save_pretrained(d)
    cfg = C.load_config(overrides=["--rm.model.path", str(d), "--rm.normalization", "none",
                                   "--rm.data.max_train_examples", "64"]).rm
    trainer = RMTrainer(cfg, tmp_path / "out")
    trainer.build_datasets()
    rm = trainer.build_model()
    assert torch.equal(rm.head.linear.weight, hf.score.weight.float()) and rm.score_skip_token_id == tok.eos_token_id


def test_reward_model_directory_as_policy_names_its_kind(tmp_path):
    RewardModel.from_pretrained(tiny_config("llama", vocab_size=V), new_head=True, seed=0).save_pretrained(tmp_path / "r")
    with pytest.raises(ValueError, match=r"saved as a 'reward_model', not a policy"):
        Policy.from_pretrained(tmp_path / "r")


def test_weights_that_do_not_fit_the_config_are_named(tmp_path):
    load_causal_lm(tiny_config("llama", vocab_size=V), seed=0).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["vocab_size"] = V + 5  # edited by hand, or another checkpoint's config
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"m: its weights do not fit its config\.json \(LlamaForCausalLM\)"):
        load_causal_lm(tmp_path / "m")
