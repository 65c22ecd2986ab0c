"""The newcomer path end to end: a user's own tiny Qwen2 or Llama model saved with
``save_pretrained``, a tokenizer trained locally and saved beside it (EOS the chat turn's end, a
chat template; Qwen2's tokenizer class pads with "<|endoftext|>", Llama's has no pad, so "[PAD]" is
added and the embedding grows by that row), chat JSONL data, and a Hugging Face
``...ForSequenceClassification`` reward model -> SFT through the CLI -> a reward model from the
SFT model on chat preference pairs (Python API) -> PPO through the Python API with the HF reward
model, whose trained head must score every rollout exactly as the HF model itself does. Tiny
sizes: seconds, not minutes."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from rlhf_fast import config as C
from rlhf_fast.cli import main
from rlhf_fast.data import write_jsonl
from rlhf_fast.models import Policy, RewardModel, load_causal_lm
from rlhf_fast.trainers.ppo import PPOTrainer
from rlhf_fast.trainers.rm import RMTrainer
from rlhf_fast.trainers.run.metrics_log import read_metrics

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ANIMALS = ["cat", "dog", "bird", "fish", "cow", "fox"]
MOODS = ["happy", "sad", "calm", "loud"]


def _user_tokenizer(corpus):
    """A byte-level BPE trained here, Llama-style without a pad token; EOS "<|im_end|>", a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=CHATML)


def _config(arch, tok, **kw):
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                  eos_token_id=tok.eos_token_id, **kw)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=True, **common)
    return LlamaConfig(tie_word_embeddings=False, **common)


def _question(i):
    return f"how is the {ANIMALS[i % len(ANIMALS)]} today"


def _answer(i):
    return f"the {ANIMALS[i % len(ANIMALS)]} is {MOODS[i % len(MOODS)]}"


def _make_user_files(root, arch):
    """The user's model and tokenizer (root/my-model), HF reward model (root/my-reward-model) and
    chat data (root/{sft,prefs,prompts}.jsonl)."""
    corpus = [_question(i) + " " + _answer(i) for i in range(48)] + ["system user assistant"]
    tok = _user_tokenizer(corpus * 3)
    torch.manual_seed(0)
    model_dir, rm_dir = root / "my-model", root / "my-reward-model"
    load_causal_lm(_config(arch, tok), seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    user_tok = AutoTokenizer.from_pretrained(model_dir)  # what transformers makes of it for this architecture
    # the reward model as TRL trains one: its config's pad is the tokenizer's, or EOS for a tokenizer
    # without one (transformers then reads the score at the last token before a trailing EOS)
    rm_pad = user_tok.pad_token if user_tok.pad_token is not None else user_tok.eos_token
    hf_rm = AutoModelForSequenceClassification.from_config(
        _config(arch, tok, num_labels=1, pad_token_id=user_tok.convert_tokens_to_ids(rm_pad)))
    with torch.no_grad():
        hf_rm.score.weight.normal_(0.0, 1.0)  # a "trained" head: anything but a fresh draw
    hf_rm.save_pretrained(rm_dir)
    user_tok.pad_token = rm_pad
    user_tok.save_pretrained(rm_dir)
    sys_msg = {"role": "system", "content": "answer briefly"}
    write_jsonl(root / "sft.jsonl", [{"messages": [sys_msg, {"role": "user", "content": _question(i)},
                                                   {"role": "assistant", "content": _answer(i)}]} for i in range(40)])
    write_jsonl(root / "prefs.jsonl", [{"chosen": [{"role": "user", "content": _question(i)},
                                                   {"role": "assistant", "content": _answer(i)}],
                                        "rejected": [{"role": "user", "content": _question(i)},
                                                     {"role": "assistant", "content": "no"}]} for i in range(24)])
    write_jsonl(root / "prompts.jsonl", [{"prompt": [{"role": "user", "content": _question(i)}]} for i in range(24)])
    return arch, root


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def user_files(request, tmp_path_factory):
    return _make_user_files(tmp_path_factory.mktemp(f"newcomer-{request.param}"), request.param)


class RecordingPPOTrainer(PPOTrainer):
    """Keeps every (sequence, mask, score) the reward model produced (its rollout stage's Scorer
    wrapped: trainers/rollout.py)."""

    def setup_stage(self):
        super().setup_stage()
        self.scored, scorer = [], self.rollouts.scorer

        def recording(r, prompts, **kw):
            scores = scorer(r, prompts, **kw)
            self.scored.append((torch.cat([r.query_ids, r.score_ids], 1).cpu(),
                                torch.cat([r.query_mask, r.score_mask], 1).cpu(), scores.cpu()))
            return scores

        self.rollouts.scorer = recording


def test_own_model_tokenizer_chat_data_and_hf_reward_model(user_files, tmp_path):
    arch, root = user_files
    quiet = [f"--{s}.logging.{k}" for s in ("sft", "rm", "ppo") for k in ("progress_bar", "tensorboard")]
    quiet = [x for q in quiet for x in (q, "false")]
    # 1. SFT through the CLI on the user's model, tokenizer and chat data
    sft_dir = tmp_path / "sft"
    assert main(["sft", "--output-dir", str(sft_dir), *quiet, "--sft.model.path", str(root / "my-model"),
                 "--sft.data.train_file", str(root / "sft.jsonl"), "--sft.max_steps", "3", "--sft.batch_size", "8",
                 "--sft.micro_batch_size", "8", "--sft.eval_batch_size", "8"]) == 0
    sft_tok = AutoTokenizer.from_pretrained(sft_dir / "model")
    user_tok = AutoTokenizer.from_pretrained(root / "my-model")
    if arch == "qwen2":  # Qwen2's tokenizer pads with "<|endoftext|>" (not EOS): kept, no new token
        assert sft_tok.pad_token == "<|endoftext|>" and sft_tok.get_vocab() == user_tok.get_vocab()
        assert Policy.from_pretrained(sft_dir / "model").config.vocab_size == len(user_tok)
    else:  # no pad: "[PAD]" was added, and the embedding grew by exactly that row
        assert user_tok.pad_token is None and sft_tok.pad_token == "[PAD]"
        assert sft_tok.get_vocab() == user_tok.get_vocab() | {"[PAD]": len(user_tok)}
        assert Policy.from_pretrained(sft_dir / "model").config.vocab_size == len(user_tok) + 1

    # 2. (optional stage) a reward model from the SFT model on TRL-style chat preference pairs
    cfg = C.load_config(overrides=[*quiet, "--rm.sft_model", str(sft_dir / "model"), "--rm.data.train_file",
                                   str(root / "prefs.jsonl"), "--rm.max_steps", "2", "--rm.batch_size", "8",
                                   "--rm.micro_batch_size", "8", "--rm.eval_batch_size", "8",
                                   "--rm.normalization", "none"])
    rm_metrics = RMTrainer(cfg.rm, tmp_path / "rm").fit()
    assert 0.0 <= rm_metrics["eval/accuracy"] <= 1.0
    assert RewardModel.from_pretrained(tmp_path / "rm" / "model").score_skip_token_id is None

    # 3. PPO through the Python API with the HF sequence-classification reward model and chat prompts
    cfg = C.load_config(overrides=[
        *quiet, "--ppo.policy.path", str(sft_dir / "model"), "--ppo.reward.model_path", str(root / "my-reward-model"),
        "--ppo.data.train_file", str(root / "prompts.jsonl"), "--ppo.iterations", "2", "--ppo.rollout_batch_size", "8",
        "--ppo.eval_prompts", "8", "--ppo.generation.max_new_tokens", "6", "--ppo.algo.num_minibatches", "2",
        "--ppo.algo.num_epochs", "1", "--ppo.logging.eval_every", "0"])
    trainer = RecordingPPOTrainer(cfg.ppo, tmp_path / "ppo")
    last = trainer.fit()
    assert trainer.step == 2 and (tmp_path / "ppo" / "model" / "config.json").is_file()
    assert all(torch.isfinite(torch.tensor(r.get("objective/scores", 0.0))) for r in read_metrics(tmp_path / "ppo"))
    assert "eval/score" in last

    # every score PPO trained and evaluated with equals the HF model's own output on the same tokens
    # (Llama: the policy's "[PAD]" has no row in the reward model, it is only ever at masked positions;
    # the RM's pad is EOS, so transformers reads before a trailing EOS, and so must PPO)
    hf = AutoModelForSequenceClassification.from_pretrained(root / "my-reward-model").eval()
    assert trainer.reward_model.score_skip_token_id == hf.config.pad_token_id
    assert (hf.config.pad_token_id == sft_tok.eos_token_id) == (arch == "llama")
    n = 0
    with torch.no_grad():
        for seq, mask, scores in trainer.scored:
            for row in range(seq.shape[0]):
                ids = seq[row][mask[row].bool()]
                want = hf(input_ids=ids[None]).logits[0, 0]
                assert scores[row].item() == pytest.approx(want.item(), abs=2e-5, rel=1e-4), (row, ids.tolist())
                n += 1
    assert n == 2 * 8 + 8 + 8  # two rollouts, the evaluation before training and the final one
    # the critic started from the reward model's trained head (N+, PPO-max), not a zero head
    assert torch.count_nonzero(trainer.critic_engine.module.value_head.linear.weight) > 0
    # prompts were rendered with the user's chat template (the generation prompt included)
    assert trainer.prompts.prompts[0].endswith("<|im_start|>assistant\n")


def test_cli_refuses_what_used_to_run_silently(tmp_path, capsys):
    """The issue's two silent failures, through the command line: an SFT (causal-LM) directory as
    the reward model, and a model directory without a tokenizer. Each is one error line, exit 2."""
    _, root = _make_user_files(tmp_path, "qwen2")
    quiet = ["--ppo.logging.progress_bar", "false", "--ppo.logging.tensorboard", "false"]
    rc = main(["ppo", "--output-dir", str(tmp_path / "ppo"), *quiet, "--ppo.policy.path", str(root / "my-model"),
               "--ppo.reward.model_path", str(root / "my-model"), "--ppo.data.train_file", str(root / "prompts.jsonl"),
               "--ppo.rollout_batch_size", "8", "--ppo.eval_prompts", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "my-model holds no trained reward head: it holds Qwen2ForCausalLM" in err, err
    bare = tmp_path / "bare"
    load_causal_lm(root / "my-model").save_pretrained(bare)  # the weights without the tokenizer
    rc = main(["sft", "--output-dir", str(tmp_path / "sft"), "--sft.model.path", str(bare),
               "--sft.data.train_file", str(root / "sft.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "holds no tokenizer" in err and "set sft.model.tokenizer_path" in err, err
