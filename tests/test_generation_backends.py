"""Generation backends by name (issue 29): the registry, the second backend (Hugging Face
``generate`` on a synced copy of the weights, ``engine/hf_generate.py``) against the hybrid engine,
and PPO running on it, with the trainer recomputing the old log-probs and logging the gap."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_fast import config as C
from rlhf_fast.engine import BACKENDS, Backend, HybridEngine, SamplingParams, backend_names, make_generator
from rlhf_fast.engine.hf_generate import HFGenerateBackend
from rlhf_fast.models import Policy, load_causal_lm
from rlhf_fast.tasks import tiny_config
from rlhf_fast.trainers.ppo import PPOTrainer
from rlhf_fast.trainers.run.metrics_log import read_metrics

V, PAD = 97, 0


def _model(seed=1):
    return load_causal_lm(tiny_config("llama", vocab_size=V, size="test", initializer_range=0.3), seed=seed).eval()


def _prompts(B=6, P=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, P), generator=g)
    lengths = torch.randint(2, P + 1, (B,), generator=g)
    lengths[0] = P
    mask = (torch.arange(P)[None, :] >= (P - lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def _trainer_logprobs(model, out, prompt_mask, temperature, top_k=0, top_p=1.0):
    """The trainer's log-probs of the sampled tokens: one forward over prompt + response."""
    policy = Policy(model)
    B, R = out.response_mask.shape
    P = out.sequences.shape[1] - R
    attn = torch.cat([prompt_mask.bool(), out.response_mask], 1)  # (B, P + R)
    with torch.no_grad():
        lp = policy.logprobs(out.sequences, attn.long(), response_start=P, temperature=temperature, top_k=top_k,
                             top_p=top_p).logprobs  # (B, R)
    return torch.where(out.response_mask, lp, 0.0)


def test_registry_lists_both_and_factory_builds_them():
    assert backend_names()[:2] == ("hybrid", "hf_generate")
    model = _model()
    hybrid = make_generator(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40)
    hf = make_generator(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40, backend="hf_generate")
    assert isinstance(hybrid, HybridEngine) and hybrid.logprobs_match_trainer
    assert isinstance(hf, HFGenerateBackend) and not hf.logprobs_match_trainer
    with pytest.raises(ValueError, match=r"unknown generation backend 'vllm'; known: \['hf_generate', 'hybrid'"):
        make_generator(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40, backend="vllm")
    with pytest.raises(ValueError, match=r"generation.decode 'static' .* 'hf_generate' has none"):
        make_generator(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40, backend="hf_generate",
                       decode="static")
    with pytest.raises(ValueError, match=r"\['kv_bucket'\] tune the hybrid engine"):
        make_generator(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40, backend="hf_generate", kv_bucket=32)


def test_a_backend_is_one_registry_line(monkeypatch):
    """A new backend from a test file: a builder plus one line, and the factory and the config's
    field accept it; an entry that contradicts its generator is refused."""
    class Echo:  # a "backend" that answers each prompt with its last token, twice
        logprobs_match_trainer = False

        def __init__(self, model, *, pad_token_id, max_batch_size, max_seq_len, decode="auto"):
            self.stats = None

        def generate(self, ids, mask, params):
            raise NotImplementedError

        def on_weights_updated(self):
            pass

    monkeypatch.setitem(BACKENDS._items, "echo", Backend(Echo, logprobs_match_trainer=False))
    gen = make_generator(_model(), pad_token_id=PAD, max_batch_size=2, max_seq_len=20, backend="echo")
    assert isinstance(gen, Echo)
    assert C.load_config(overrides=["--ppo.generation.backend", "echo"]).ppo.generation.backend == "echo"
    monkeypatch.setitem(BACKENDS._items, "liar", Backend(Echo, logprobs_match_trainer=True))
    with pytest.raises(ValueError, match="disagree on logprobs_match_trainer"):
        make_generator(_model(), pad_token_id=PAD, max_batch_size=2, max_seq_len=20, backend="liar")


def test_greedy_tokens_equal_the_hybrid_engine():
    """Greedy decoding is HF's own on both backends: the same tokens, masks and pads; the log-probs
    are at the requested temperature on both and agree to float32 rounding."""
    model = _model()
    ids, mask = _prompts()
    params = SamplingParams(max_new_tokens=12, do_sample=False, temperature=0.7, eos_token_id=5, stop_token_ids=(11,))
    a = HybridEngine(model, pad_token_id=PAD, max_batch_size=4, max_seq_len=40).generate(ids, mask, params)
    b = HFGenerateBackend(model, pad_token_id=PAD, max_batch_size=4, max_seq_len=40).generate(ids, mask, params)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.response_mask, b.response_mask)
    torch.testing.assert_close(b.logprobs, a.logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (7, 1.0), (0, 0.8)])
def test_sampled_rollouts_contract_and_gap(top_k, top_p):
    """Sampling: a seed gives one output; the mask runs through the first stop token with pads
    after it; the log-probs are finite on valid tokens, 0 elsewhere, and within float32 noise of the
    trainer's (the gap the trainer logs: other code, same distribution)."""
    model = _model()
    ids, mask = _prompts()
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_k=top_k, top_p=top_p, eos_token_id=5,
                            stop_token_ids=(11, 12), seed=1234)
    gen = HFGenerateBackend(model, pad_token_id=PAD, max_batch_size=4, max_seq_len=40)
    out = gen.generate(ids, mask, params)
    again = gen.generate(ids, mask, params)
    assert torch.equal(out.sequences, again.sequences) and torch.equal(out.logprobs, again.logprobs)
    resp, m = out.responses, out.response_mask
    for b in range(ids.shape[0]):
        L = int(m[b].sum())
        assert m[b, :L].all() and not m[b, L:].any()
        assert (resp[b, L:] == PAD).all()
        stops = torch.isin(resp[b, :L], torch.tensor([5, 11, 12]))
        assert not stops[: L - 1].any()  # nothing stopped the row before its last valid token
    assert torch.isfinite(out.logprobs).all() and (out.logprobs[~m] == 0).all() and (out.logprobs[m] < 0).all()
    gap = (out.logprobs - _trainer_logprobs(model, out, mask, 0.9, top_k, top_p)).abs().max()
    assert gap < 1e-4, gap


def test_weights_are_a_copy_until_synced():
    """The backend samples from its own copy: a change to the policy shows in its rollouts only
    after ``on_weights_updated``, which copies every tensor and counts the bytes."""
    model = _model()
    ids, mask = _prompts()
    params = SamplingParams(max_new_tokens=8, do_sample=False, eos_token_id=None)
    gen = HFGenerateBackend(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40)
    before = gen.generate(ids, mask, params)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    stale = gen.generate(ids, mask, params)
    assert torch.equal(stale.sequences, before.sequences)  # still the old weights
    gen.on_weights_updated()
    fresh = gen.generate(ids, mask, params)
    live = HybridEngine(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40).generate(ids, mask, params)
    assert torch.equal(fresh.sequences, live.sequences) and not torch.equal(fresh.sequences, before.sequences)
    n_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert gen.stats.weight_syncs == 1 and gen.stats.weight_sync_bytes == n_bytes
    assert gen.stats.calls == 3


def test_bad_inputs_are_named():
    gen = HFGenerateBackend(_model(), pad_token_id=PAD, max_batch_size=4, max_seq_len=12)
    ids, mask = _prompts(P=7)
    with pytest.raises(ValueError, match="exceeds max_seq_len 12"):
        gen.generate(ids, mask, SamplingParams(max_new_tokens=6))
    right = mask.flip(1)
    with pytest.raises(ValueError, match="left padded"):
        gen.generate(ids, right, SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="same non-empty"):
        gen.generate(ids, mask[:, :3], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="SamplingParams"):
        gen.generate(ids, mask, {"max_new_tokens": 2})


# ---- PPO on the second backend ---------------------------------------------------------------

QUIET = ["--ppo.logging.progress_bar", "false", "--ppo.logging.tensorboard", "false"]
TINY = ["--ppo.policy.size", "test", "--ppo.reward.function", "task:gold", "--ppo.iterations", "3",
        "--ppo.rollout_batch_size", "8", "--ppo.generation.max_new_tokens", "8", "--ppo.eval_prompts", "8",
        "--ppo.logging.eval_every", "0", "--ppo.algo.num_minibatches", "2", "--ppo.algo.num_epochs", "2",
        "--ppo.critic", "value_head", "--ppo.optim.lr", "1e-3"]


def test_config_refuses_rollout_logprobs_from_a_backend_that_does_not_match():
    with pytest.raises(ValueError, match=r"ppo.old_logprobs 'rollout' .* ppo.generation.backend 'hf_generate'"):
        C.load_config(overrides=["--ppo.generation.backend", "hf_generate", "--ppo.old_logprobs", "rollout"])
    with pytest.raises(ValueError, match=r"ppo.generation.backend"):
        C.load_config(overrides=["--ppo.generation.backend", "vllm"])


@pytest.mark.slow
def test_ppo_runs_on_hf_generate(tmp_path):
    """PPO on the second backend: every iteration's update is followed by one weight sync, the old
    log-probs are the trainer's own (so the first minibatch's approx-KL is 0 and the ratio 1), and the
    engine-vs-trainer gap is logged, finite and small (other code, same weights and distribution)."""
    cfg = C.load_config(overrides=[*QUIET, *TINY, "--ppo.generation.backend", "hf_generate"]).ppo
    trainer = PPOTrainer(cfg, tmp_path)
    trainer.fit()
    assert isinstance(trainer.gen, HFGenerateBackend)
    assert trainer.gen.stats.weight_syncs == cfg.iterations
    rows = [r for r in read_metrics(tmp_path) if "objective/kl" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        gap = r["generation/logprob_gap_max"]
        assert math.isfinite(gap) and gap < 1e-3, gap
        assert math.isfinite(r["objective/scores"]) and math.isfinite(r["policy/approxkl"])
    assert rows[0]["objective/kl"] == 0.0  # the first rollout's policy is the reference
