"""rlhf_fast.models: log-probs vs the HF loss, left padding, heads, reward reading, normalisation,
save/load round trips, dropout, loading errors. Tiny random models of four architectures."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, note, settings
from hypothesis import strategies as st

from rlhf_fast.models import (
    Critic,
    Policy,
    RewardModel,
    gather_last_valid,
    last_valid_index,
    load_causal_lm,
    position_ids_from_mask,
    resize_embeddings_for_tokenizer,
)
from rlhf_fast.tasks import ARCHITECTURES, tiny_config

V = 61  # odd vocabulary on purpose
PAD = 0


@functools.lru_cache(maxsize=None)
def _policy(arch: str) -> Policy:
    return Policy.from_pretrained(tiny_config(arch, vocab_size=V), seed=1234, value_head=True).eval()


@functools.lru_cache(maxsize=None)
def _reward_model(arch: str) -> RewardModel:
    return RewardModel.from_pretrained(tiny_config(arch, vocab_size=V), new_head=True, seed=7).eval()


def _random_batch(B, T, *, seed=0, left_pad=None):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, n in enumerate(left_pad or []):
        mask[b, :n] = 0
        ids[b, :n] = PAD
    return ids, mask


def _left_pad(rows, L):
    ids = torch.full((len(rows), L), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = r
        mask[b, L - len(r):] = 1
    return ids, mask


def _right_pad(rows, L):
    ids = torch.full((len(rows), L), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        mask[b, : len(r)] = 1
    return ids, mask


# ---- position ids and last-valid index: pure properties ------------------------------------------

@given(st.lists(st.lists(st.booleans(), min_size=7, max_size=7), min_size=1, max_size=5))
def test_position_ids_count_valid_tokens_before(rows):
    mask = torch.tensor(rows, dtype=torch.long)
    pos = position_ids_from_mask(mask)
    for b, row in enumerate(rows):
        for t, valid in enumerate(row):
            if valid:  # a valid token's position = number of valid tokens before it
                assert pos[b, t] == sum(row[:t])
            assert pos[b, t] >= 0


@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=5))
def test_last_valid_index_left_and_right_padding(spans):
    T = 13
    mask = torch.zeros(len(spans), T, dtype=torch.long)
    expected = []
    for b, (left, n) in enumerate(spans):
        mask[b, left : left + n] = 1
        expected.append(left + n - 1 if n else 0)  # empty row -> 0 (documented)
    assert last_valid_index(mask).tolist() == expected
    vals = torch.arange(len(spans) * T, dtype=torch.float32).view(len(spans), T)
    assert gather_last_valid(vals, mask).tolist() == [vals[b, e].item() for b, e in enumerate(expected)]


# ---- log-probs equal minus the HF model's own cross-entropy ------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logprobs_equal_minus_hf_cross_entropy(arch):
    policy = _policy(arch)
    ids, mask = _random_batch(3, 11, seed=1)
    mask[2, 8:] = 0  # right padding on one row: its padded targets are ignored
    ids[2, 8:] = PAD
    with torch.no_grad():
        ours = policy.logprobs(ids, mask).logprobs  # (3, 10)
        labels = ids.masked_fill(mask == 0, -100)
        out = policy.model(input_ids=ids, attention_mask=mask, labels=labels)
        ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1), reduction="none",
                             ignore_index=-100).view(3, 10)
    valid = labels[:, 1:] != -100
    torch.testing.assert_close(ours, -ce, atol=1e-5, rtol=1e-5)
    assert torch.all(ours[~valid] == 0)
    # The HF loss is the mean token cross-entropy over valid targets.
    torch.testing.assert_close(-ours[valid].mean(), out.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_logprobs_temperature_entropy_and_response_start(arch):
    policy = _policy(arch)
    ids, mask = _random_batch(2, 9, seed=2)
    T = 0.7
    with torch.no_grad():
        full = policy.logprobs(ids, mask, temperature=T, return_entropy=True)
        logits = policy.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / T
        logp = logits.log_softmax(-1)
        expected = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        part = policy.logprobs(ids, mask, temperature=T, response_start=5)
    torch.testing.assert_close(full.logprobs, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.entropy, entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(part.logprobs, full.logprobs[:, 4:], atol=1e-6, rtol=0)
    assert part.values.shape == part.logprobs.shape == (2, 4)
    # The flag picks ops.linear_logprobs when present, else falls back: same numbers either way.
    policy.use_linear_logprobs = True
    try:
        with torch.no_grad():
            lin = policy.logprobs(ids, mask, temperature=T)
    finally:
        policy.use_linear_logprobs = False
    torch.testing.assert_close(lin.logprobs, full.logprobs, atol=1e-5, rtol=1e-5)


def test_use_linear_logprobs_calls_the_op_when_present(monkeypatch):
    import rlhf_fast.ops as ops

    calls = []

    def spy(hidden, weight, labels, **kw):
        calls.append((hidden.shape, weight.shape))
        return ops.gather_logprobs(hidden @ weight.T, labels, **kw)

    monkeypatch.setattr(ops, "linear_logprobs", spy, raising=False)
    policy = Policy.from_pretrained(tiny_config("gpt2", vocab_size=V), seed=0, use_linear_logprobs=True)
    ids, mask = _random_batch(2, 6)
    lp = policy.logprobs(ids, mask, response_start=2).logprobs
    assert calls == [((2, 4, 32), (V, 32))] and lp.shape == (2, 4)
    monkeypatch.delattr(ops, "linear_logprobs")  # an older build without the op: falls back
    torch.testing.assert_close(policy.logprobs(ids, mask, response_start=2).logprobs, lp)


def test_logprobs_are_differentiable():
    policy = Policy.from_pretrained(tiny_config("gpt2", vocab_size=V), seed=0)
    ids, mask = _random_batch(2, 6)
    policy.logprobs(ids, mask).logprobs.sum().backward()
    assert policy.model.get_input_embeddings().weight.grad.abs().sum() > 0


# ---- left padding reproduces the unpadded outputs ------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
@settings(max_examples=6)
@given(data=st.data())
def test_left_padded_logits_equal_unpadded(arch, data):
    policy = _policy(arch)
    lengths = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=4), label="lengths")
    extra = data.draw(st.integers(0, 3), label="extra_pad")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    note(f"arch={arch} lengths={lengths} extra={extra}")
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, V, (n,), generator=g) for n in lengths]
    ids, mask = _left_pad(rows, max(lengths) + extra)
    with torch.no_grad():
        padded = policy.logits(ids, mask)
        for b, r in enumerate(rows):
            alone = policy.logits(r[None], torch.ones(1, len(r), dtype=torch.long))[0]
            torch.testing.assert_close(padded[b, -len(r):], alone, atol=2e-5, rtol=1e-4)


# ---- heads ---------------------------------------------------------------------------------------

def test_reward_head_init_statistics_and_seed():
    d = 256
    cfg = tiny_config("gpt2", vocab_size=V, n_embd=d, n_head=4, n_layer=1)
    weights = torch.cat([RewardModel.from_pretrained(cfg, new_head=True, seed=s).head.linear.weight.flatten() for s in range(4)])
    std = 1 / math.sqrt(d + 1)  # N details #8
    n = weights.numel()  # 1024 draws: the sample std is within ~2.2% (1 SE), so 10% is > 4 SE
    assert abs(weights.std().item() / std - 1) < 0.10
    assert abs(weights.mean().item()) < 4 * std / math.sqrt(n)
    rm = RewardModel.from_pretrained(cfg, new_head=True, seed=3)
    assert torch.all(rm.head.linear.bias == 0)
    again = RewardModel.from_pretrained(cfg, new_head=True, seed=3)
    assert torch.equal(rm.head.linear.weight, again.head.linear.weight)
    assert not torch.equal(rm.head.linear.weight, RewardModel.from_pretrained(cfg, new_head=True, seed=4).head.linear.weight)


def test_value_heads_start_at_zero():
    cfg = tiny_config("llama", vocab_size=V)
    policy = Policy.from_pretrained(cfg, seed=0, value_head=True)
    critic = Critic.from_pretrained(cfg, seed=0)
    for head in (policy.value_head, critic.value_head):
        assert torch.all(head.linear.weight == 0) and torch.all(head.linear.bias == 0)
    ids, mask = _random_batch(2, 5)
    assert torch.all(critic(ids, mask).values == 0)
    assert Policy.from_pretrained(cfg, seed=0).value_head is None


# ---- reward at the last valid token --------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reward_read_at_last_valid_token_left_and_right(arch):
    rm = _reward_model(arch)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, V, (n,), generator=g) for n in (3, 7, 5)]
    with torch.no_grad():
        alone = torch.stack([rm(r[None], torch.ones(1, len(r), dtype=torch.long)).raw_scores[0] for r in rows])
        left = rm(*_left_pad(rows, 9))
        right = rm(*_right_pad(rows, 9))
    torch.testing.assert_close(left.raw_scores, alone, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(right.raw_scores, alone, atol=2e-5, rtol=1e-4)
    # Right padding: the score is the per-token reward at index len - 1, not at the last column.
    idx = torch.tensor([len(r) - 1 for r in rows])
    assert torch.equal(right.raw_scores, right.rewards[torch.arange(3), idx])
    assert torch.equal(left.raw_scores, left.rewards[:, -1])
    assert left.rewards.shape == (3, 9)


# ---- normalisation -------------------------------------------------------------------------------

def test_normalization_gives_mean_0_std_1_on_calibration_samples():
    rm = RewardModel.from_pretrained(tiny_config("gpt_neox", vocab_size=V), new_head=True, seed=5)
    ids, mask = _random_batch(40, 8, seed=9, left_pad=[i % 4 for i in range(40)])
    raw = rm.calibrate(ids, mask, batch_size=16)
    with torch.no_grad():
        scores = rm(ids, mask).scores.double()
    assert abs(scores.mean().item()) < 1e-5
    assert abs(scores.std(unbiased=False).item() - 1) < 1e-5  # population std, as TF's moments
    assert rm.normalization["mode"] == "samples" and rm.normalization["num_samples"] == 40
    # N+ variant: subtract the mean score of reference responses, gain 1.
    rm.calibrate(ids[:20], mask[:20], reference=True)
    with torch.no_grad():
        ref = rm(ids[:20], mask[:20])
    assert rm.gain.item() == 1.0
    assert abs(ref.scores.double().mean().item()) < 1e-5
    torch.testing.assert_close(ref.scores - ref.raw_scores, torch.full((20,), -raw[:20].double().mean().item()),
                               atol=1e-5, rtol=0, check_dtype=False)


def test_normalization_rejects_constant_scores():
    rm = RewardModel.from_pretrained(tiny_config("gpt2", vocab_size=V), new_head=True, seed=0)
    with pytest.raises(ValueError, match="std"):
        rm.set_normalization(torch.ones(8))


# ---- save / load round trips ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trips(arch, tmp_path):
    cfg = tiny_config(arch, vocab_size=V)
    ids, mask = _random_batch(3, 7, seed=4, left_pad=[0, 2, 4])
    policy = Policy.from_pretrained(cfg, seed=1, value_head=True)
    with torch.no_grad():
        policy.value_head.linear.weight.normal_()  # non-trivial head
    rm = RewardModel.from_pretrained(cfg, new_head=True, seed=2)
    rm.calibrate(ids, mask)
    critic = Critic.from_reward_model(rm)
    policy.save_pretrained(tmp_path / "policy")
    rm.save_pretrained(tmp_path / "rm")
    critic.save_pretrained(tmp_path / "critic")
    policy2 = Policy.from_pretrained(tmp_path / "policy")
    rm2 = RewardModel.from_pretrained(tmp_path / "rm")
    critic2 = Critic.from_pretrained(tmp_path / "critic")
    with torch.no_grad():
        a, b = policy.logprobs(ids, mask), policy2.logprobs(ids, mask)
        assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.values, b.values)
        r1, r2 = rm(ids, mask), rm2(ids, mask)
        assert torch.equal(r1.scores, r2.scores) and torch.equal(r1.rewards, r2.rewards)
        assert torch.equal(critic(ids, mask).values, critic2(ids, mask).values)
        # The critic starts from the reward model (N+, PPO-max): same per-token outputs.
        assert torch.equal(critic(ids, mask).values, r1.rewards)
        # A saved reward model also initialises a critic directly.
        assert torch.equal(Critic.from_pretrained(tmp_path / "rm")(ids, mask).values, r1.rewards)
    assert rm2.normalization == rm.normalization
    # The HF files alone load in transformers (heads live beside them).
    plain = load_causal_lm(tmp_path / "policy")
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits,
                           policy.logits(ids, mask))


def test_reward_model_from_sft_policy_keeps_backbone(tmp_path):
    cfg = tiny_config("qwen2", vocab_size=V)
    policy = Policy.from_pretrained(cfg, seed=3)
    policy.save_pretrained(tmp_path / "sft")
    ids, mask = _random_batch(2, 6)
    rm_dir = RewardModel.from_pretrained(tmp_path / "sft", new_head=True, seed=1)
    rm_mem = RewardModel.from_pretrained(policy.model, new_head=True, seed=1)
    with torch.no_grad():
        h = policy(ids, mask).hidden
        torch.testing.assert_close(rm_dir(ids, mask).hidden, h, atol=0, rtol=0)
        torch.testing.assert_close(rm_mem(ids, mask).hidden, h, atol=0, rtol=0)
    assert rm_mem.backbone is not policy.backbone  # a copy, never shared weights


def test_wrong_kind_is_refused(tmp_path):
    Critic.from_pretrained(tiny_config("gpt2", vocab_size=V), seed=0).save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="critic"):
        Policy.from_pretrained(tmp_path / "c")


# ---- dropout, loading, resizing ------------------------------------------------------------------

def test_dropout_disabled_everywhere():
    cfg = tiny_config("gpt2", vocab_size=V, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    policy = Policy.from_pretrained(cfg, seed=0)
    assert cfg.resid_pdrop == 0.3  # the caller's config is not mutated
    assert policy.config.resid_pdrop == policy.config.attn_pdrop == policy.config.embd_pdrop == 0.0
    assert all(m.p == 0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))
    policy.train()
    ids, mask = _random_batch(2, 6)
    assert torch.equal(policy.logprobs(ids, mask).logprobs, policy.logprobs(ids, mask).logprobs)
    neox = Policy.from_pretrained(tiny_config("gpt_neox", vocab_size=V, attention_dropout=0.2, hidden_dropout=0.2), seed=0)
    assert all(getattr(m, "attention_dropout", 0.0) == 0.0 for m in neox.modules())


def test_loading_never_downloads():
    with pytest.raises(ValueError, match="not a local directory"):
        load_causal_lm("gpt2")
    with pytest.raises(ValueError, match="not a local directory"):
        RewardModel.from_pretrained("EleutherAI/pythia-160m")


def test_bad_inputs_are_named():
    policy = _policy("gpt2")
    ids, mask = _random_batch(2, 5)
    with pytest.raises(ValueError, match="attention_mask"):
        policy(ids, mask[:, :4])
    with pytest.raises(ValueError, match="input_ids"):
        policy(ids.float(), mask)
    with pytest.raises(ValueError, match="response_start"):
        policy.logprobs(ids, mask, response_start=0)


class _Tok:
    """The things the resize helper reads: a size, a pad id, and the special tokens added on top
    of the base vocabulary (``added_tokens_decoder``)."""

    def __init__(self, size, added):
        from tokenizers import AddedToken

        self.size, self.pad_token_id = size, size - 1
        self.added_tokens_decoder = {i: AddedToken(f"<s{i}>", special=True) for i in added}

    def __len__(self):
        return self.size


def test_resize_embeddings_for_tokenizer():
    model = load_causal_lm(tiny_config("llama", vocab_size=V), seed=0)
    assert resize_embeddings_for_tokenizer(model, _Tok(V + 1, added=[V]))  # prepare_tokenizer's "[PAD]"
    assert model.get_input_embeddings().weight.shape[0] == V + 1
    assert model.get_output_embeddings().weight.shape[0] == V + 1
    assert model.config.pad_token_id == V
    assert not resize_embeddings_for_tokenizer(model, _Tok(V + 1, added=[V]))


def test_resize_refuses_a_tokenizer_of_another_model():
    """A tokenizer whose ordinary vocabulary exceeds the embedding (the built-in 631-token one on a
    user's model) used to grow the embedding silently: every id past the model's would be wrong."""
    model = load_causal_lm(tiny_config("qwen2", vocab_size=V), seed=0)
    with pytest.raises(ValueError, match=rf"my model: the tokenizer has {V + 40} tokens but the model's embedding "
                                         rf"has {V} rows \(ids {V}\.\.{V + 38} have none\)"):
        resize_embeddings_for_tokenizer(model, _Tok(V + 40, added=[V + 39]), what="my model")
    assert model.get_input_embeddings().weight.shape[0] == V  # untouched
