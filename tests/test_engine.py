"""HybridEngine on CPU: greedy parity with Hugging Face ``generate`` (four architectures, left
padding, rows stopping at different steps), log-probs equal to a training-mode recomputation
(with temperature, top-k, top-p), top-k support, seeded reproducibility, live weights without
copies, mode restoration, KV-buffer reuse, and bad input."""

from __future__ import annotations

import inspect

import pytest
import torch

import rlhf_fast.ops as ops
from rlhf_fast.engine import HybridEngine, SamplingParams, filter_logits
from rlhf_fast.models import Policy, load_causal_lm, position_ids_from_mask
from rlhf_fast.tasks import ARCHITECTURES, tiny_config

V = 97
PAD = 0


def _model(arch="llama", seed=1, **kw):
    return load_causal_lm(tiny_config(arch, vocab_size=V, size="test", **kw), seed=seed)


def _prompts(B=10, P=9, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, P), generator=g)
    lengths = torch.randint(2, P + 1, (B,), generator=g)
    lengths[0] = P  # at least one unpadded row
    mask = (torch.arange(P)[None, :] >= (P - lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def _pick_eos(gen: torch.Tensor) -> int:
    """A token greedy decoding emits first at several different steps (and not in every row)."""
    best, best_score = None, -1
    for tok in gen.unique().tolist():
        hits = [(row == tok).nonzero() for row in gen]
        first = {int(h[0]) for h in hits if len(h)}
        score = len(first) + (1 if any(len(h) == 0 for h in hits) else 0)
        if tok != PAD and score > best_score:
            best, best_score = tok, score
    return best


def _hf_greedy(model, ids, mask, n, eos):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD, eos_token_id=eos,
        num_beams=1,
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_hf_generate(arch):
    model = _model(arch, initializer_range=0.3).eval()  # wider init: less repetitive greedy text
    ids, mask = _prompts()
    n = 24
    eos = _pick_eos(_hf_greedy(model, ids, mask, n, None)[:, ids.shape[1] :])
    expected = _hf_greedy(model, ids, mask, n, eos)
    engine = HybridEngine(model, pad_token_id=PAD, max_batch_size=16, max_seq_len=64)
    out = engine.generate(ids, mask, SamplingParams(max_new_tokens=n, do_sample=False, eos_token_id=eos))
    lengths = out.response_mask.sum(1)
    assert len(set(lengths.tolist()) - {n}) >= 2, "rows should stop at EOS at different steps"
    assert out.sequences.dtype == torch.int64 and out.response_mask.dtype == torch.bool
    assert out.logprobs.dtype == torch.float32
    assert torch.equal(out.sequences, expected)
    # the mask covers tokens up to and including EOS, pad after it
    R = out.response_mask.shape[1]
    resp = out.responses
    for b in range(ids.shape[0]):
        L = int(lengths[b])
        assert out.response_mask[b, :L].all() and not out.response_mask[b, L:].any()
        assert (resp[b, L:] == PAD).all()
        if L < R or (resp[b] == eos).any():
            assert resp[b, L - 1] == eos and not (resp[b, : L - 1] == eos).any()
    assert (out.logprobs[~out.response_mask] == 0).all()
    assert engine.stats.compactions >= 1  # finished rows were dropped from the batch


def test_greedy_chunked_batch_and_policy_wrapper():
    """A batch above max_batch_size is split (not truncated); a Policy wraps the same model."""
    model = _model("gpt2", initializer_range=0.3).eval()
    ids, mask = _prompts(B=11)
    eos = _pick_eos(_hf_greedy(model, ids, mask, 16, None)[:, ids.shape[1] :])
    expected = _hf_greedy(model, ids, mask, 16, eos)
    policy = Policy(model, value_head=True)
    engine = HybridEngine(policy, pad_token_id=PAD, max_batch_size=4, max_seq_len=32)
    out = engine.generate(ids, mask, SamplingParams(max_new_tokens=16, do_sample=False, eos_token_id=eos))
    assert out.sequences.shape[0] == 11
    assert torch.equal(out.sequences, expected)


def _training_logprobs(model, out, mask, params):
    """Log-probs of the generated tokens from one training-mode forward of the full sequences,
    with the same temperature and the same top-k / top-p filtering (``ops.gather_logprobs``)."""
    P = mask.shape[1]
    full_mask = torch.cat([mask.bool(), out.response_mask], 1).long()
    was_training = model.training
    model.train()
    try:
        logits = model(
            input_ids=out.sequences, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask)
        ).logits
    finally:
        model.train(was_training)
    logits = logits[:, P - 1 : -1].detach()
    labels = out.responses.masked_fill(~out.response_mask, -100)
    if params.top_k or params.top_p < 1.0:
        z = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
        return ops.gather_logprobs(z, labels), logits
    return ops.gather_logprobs(logits, labels, temperature=params.temperature), logits


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("llama", dict(temperature=0.7)),
        ("gpt2", dict(temperature=1.0)),
        ("qwen2", dict(temperature=1.0, top_k=5)),
        ("gpt_neox", dict(temperature=0.8, top_p=0.9)),
        ("llama", dict(temperature=1.3, top_k=12, top_p=0.8)),
        ("gpt2", dict(do_sample=False, temperature=0.7)),
    ],
)
def test_logprobs_match_training_forward(arch, kw):
    model = _model(arch)
    ids, mask = _prompts(B=8)
    params = SamplingParams(max_new_tokens=20, seed=7, eos_token_id=5, **kw)
    engine = HybridEngine(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40)
    out = engine.generate(ids, mask, params)
    assert model.training  # restored
    expected, _ = _training_logprobs(model, out, mask, params)
    diff = (out.logprobs - expected).abs().max().item()
    assert diff <= 1e-4, diff
    assert (out.logprobs[~out.response_mask] == 0).all()
    assert (out.logprobs[out.response_mask] <= 0).all()


def test_top_k_never_samples_outside_top_k():
    model = _model("llama")
    ids, mask = _prompts(B=16)
    params = SamplingParams(max_new_tokens=24, top_k=3, temperature=2.0, seed=11)
    out = HybridEngine(model, pad_token_id=PAD, max_batch_size=16, max_seq_len=40).generate(ids, mask, params)
    _, logits = _training_logprobs(model, out, mask, params)
    kth = logits.topk(3, -1).values[..., -1]
    picked = logits.gather(-1, out.responses[..., None]).squeeze(-1)
    assert (picked >= kth - 1e-5)[out.response_mask].all()


def test_top_p_keeps_argmax_only_when_tiny():
    model = _model("gpt2")
    ids, mask = _prompts(B=6)
    greedy = HybridEngine(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40).generate(
        ids, mask, SamplingParams(max_new_tokens=10, do_sample=False)
    )
    nucleus = HybridEngine(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40).generate(
        ids, mask, SamplingParams(max_new_tokens=10, top_p=1e-6, seed=1)
    )
    assert torch.equal(greedy.sequences, nucleus.sequences)
    assert torch.allclose(nucleus.logprobs, torch.zeros_like(nucleus.logprobs))


def test_same_seed_same_output():
    model = _model("qwen2")
    ids, mask = _prompts(B=8)
    engine = HybridEngine(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40)
    p = SamplingParams(max_new_tokens=16, seed=123, eos_token_id=7, top_p=0.95)
    a, b = engine.generate(ids, mask, p), engine.generate(ids, mask, p)
    c = engine.generate(ids, mask, SamplingParams(max_new_tokens=16, seed=124, eos_token_id=7, top_p=0.95))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.sequences, c.sequences)
    # seeded sampling does not touch the global RNG
    state = torch.get_rng_state()
    engine.generate(ids, mask, p)
    assert torch.equal(state, torch.get_rng_state())


def test_min_new_tokens_masks_eos():
    model = _model("gpt_neox").eval()
    ids, mask = _prompts(B=8)
    first = HybridEngine(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40).generate(
        ids, mask, SamplingParams(max_new_tokens=1, do_sample=False)
    )
    eos = int(first.responses[0, 0])  # greedy emits it at step 0 in row 0
    engine = HybridEngine(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=40)
    out = engine.generate(ids, mask, SamplingParams(max_new_tokens=12, min_new_tokens=4, do_sample=False, eos_token_id=eos))
    assert (out.response_mask.sum(1) >= 4).all()
    assert not (out.responses[:, :4] == eos).any()
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=4, do_sample=False,
                        pad_token_id=PAD, eos_token_id=eos)
    assert torch.equal(out.sequences, hf)


def test_stop_token_ids_and_multiple_eos():
    model = _model("llama").eval()
    ids, mask = _prompts(B=8)
    engine = HybridEngine(model, pad_token_id=PAD, max_batch_size=8, max_seq_len=48)
    free = engine.generate(ids, mask, SamplingParams(max_new_tokens=20, do_sample=False))
    a, b = _pick_eos(free.responses), int(free.responses[1, 3])
    out = engine.generate(ids, mask, SamplingParams(max_new_tokens=20, do_sample=False, eos_token_id=[a], stop_token_ids=(b,)))
    hf = _hf_greedy(model, ids, mask, 20, [a, b])
    assert torch.equal(out.sequences, hf)


def _alloc_peak_bytes(fn) -> int:
    """Peak bytes allocated through torch's CPU allocator during ``fn`` (profiler memory events)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    mem = [e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    return max([0] + [int(e["args"]["Total Allocated"]) for e in sorted(mem, key=lambda e: e["ts"])])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gradient_checkpointing_* renamed in transformers 5.2x
def test_live_weights_no_copy():
    """An optimizer step changes the next rollout; no parameter is copied (same storage, and the
    call allocates far less than one copy of the weights)."""
    model = load_causal_lm(tiny_config("llama", vocab_size=2000, size="test"), seed=1)
    policy = Policy(model, value_head=True)
    policy.model.gradient_checkpointing_enable()
    policy.train()
    ids, mask = _prompts(B=4, P=6)
    engine = HybridEngine(policy, pad_token_id=PAD, max_batch_size=4, max_seq_len=24)
    params = SamplingParams(max_new_tokens=12, do_sample=False)
    seen = []
    layer = policy.model.model.layers[0]
    hook = layer.register_forward_pre_hook(lambda m, a: seen.append((m.training, m.gradient_checkpointing)))
    before = engine.generate(ids, mask, params)
    hook.remove()
    assert seen and all(s == (False, False) for s in seen)  # inference mode inside the call
    assert policy.training and all(m.training for m in policy.modules())
    assert policy.model.is_gradient_checkpointing
    ptrs = {n: p.data_ptr() for n, p in policy.named_parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    # one large optimizer step that lowers the greedy tokens' log-probs: the argmax must move
    opt = torch.optim.SGD(policy.parameters(), lr=50.0)
    lp = policy.logprobs(before.sequences, torch.cat([mask.bool(), before.response_mask], 1).long(),
                         response_start=ids.shape[1]).logprobs
    lp.sum().backward()  # descending sum(log p) pushes the greedy tokens down
    opt.step()
    opt.zero_grad()
    allocs = engine.kv_pool.allocations
    peak = _alloc_peak_bytes(lambda: engine.generate(ids, mask, params))
    after = engine.generate(ids, mask, params)
    assert not torch.equal(before.sequences, after.sequences)
    assert {n: p.data_ptr() for n, p in policy.named_parameters()} == ptrs
    assert engine.kv_pool.allocations == allocs  # KV buffers reused across calls
    assert peak < 0.5 * param_bytes, (peak, param_bytes)
    # and the result is exactly what HF generate gives on the updated weights
    policy.eval()
    assert torch.equal(after.sequences, _hf_greedy(policy.model, ids, mask, 12, None))


def test_dropout_off_during_generate():
    """Even a model with dropout on (training mode) decodes deterministically: eval() for the call."""
    model = load_causal_lm(tiny_config("gpt2", vocab_size=V, size="test", resid_pdrop=0.5, embd_pdrop=0.5),
                           seed=1, disable_dropout=False).train()
    ids, mask = _prompts(B=4)
    engine = HybridEngine(model, pad_token_id=PAD, max_batch_size=4, max_seq_len=32)
    p = SamplingParams(max_new_tokens=8, do_sample=False)
    assert torch.equal(engine.generate(ids, mask, p).sequences, engine.generate(ids, mask, p).sequences)
    assert model.training


def test_lm_head_gets_a_contiguous_input_while_generating():
    """A frozen head (LoRA) fed HF's non-contiguous ``hidden[:, -1:]`` after the prefill made torch
    copy its weight once per row (engine/inference.py ``_contiguous_input``): the head sees contiguous
    inputs in every forward of generate, its logits are the GEMM's bits (those of a trained head, which
    torch already folds into one GEMM), and the hook is gone afterwards."""
    model = _model("llama")
    head = model.get_output_embeddings()
    head.weight.requires_grad_(False)
    seen = []
    # a forward hook sees the input the forward got (after every pre-hook, the engine's included)
    spy = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    ids, mask = _prompts(B=4, P=9)
    engine = HybridEngine(model, pad_token_id=PAD, max_batch_size=4, max_seq_len=32)
    frozen = engine.generate(ids, mask, SamplingParams(max_new_tokens=4, do_sample=False, seed=0))
    assert len(seen) >= 4 and all(seen), seen  # the prefill (P = 9 > 1) included
    assert not head._forward_pre_hooks  # the engine removed its own
    spy.remove()
    head.weight.requires_grad_(True)
    trained = engine.generate(ids, mask, SamplingParams(max_new_tokens=4, do_sample=False, seed=0))
    assert torch.equal(frozen.sequences, trained.sequences) and torch.equal(frozen.logprobs, trained.logprobs)


def test_logits_to_keep_is_seen_through_a_peft_wrapper():
    """A ``PeftModel``'s forward takes ``**kwargs``: the decoders still ask the model it wraps for the
    last position's logits only (generator.DecoderContext.logits_to_keep)."""
    peft = pytest.importorskip("peft")
    from rlhf_fast.engine.cache import KVBufferPool
    from rlhf_fast.engine.generator import DecoderContext, EngineStats

    model = _model("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    ctx = lambda lm: DecoderContext(lm=lm, config=model.config, pad_token_id=PAD, max_seq_len=32,  # noqa: E731
                                    kv_pool=KVBufferPool(2, 32), stats=EngineStats())
    assert "logits_to_keep" not in inspect.signature(wrapped.forward).parameters
    assert ctx(wrapped).logits_to_keep and ctx(model).logits_to_keep


def test_bad_inputs():
    model = _model("gpt2")
    engine = HybridEngine(model, pad_token_id=PAD, max_batch_size=4, max_seq_len=16)
    ids, mask = _prompts(B=4, P=9)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.generate(ids, mask, SamplingParams(max_new_tokens=8))
    bad = mask.clone()
    bad[2] = 0
    with pytest.raises(ValueError, match="empty prompt"):
        engine.generate(ids, bad, SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate(ids, mask, SamplingParams(max_new_tokens=4, stop_token_ids=(V,)))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.generate(ids, mask, SamplingParams(max_new_tokens=4, eos_token_id=V + 5))
    with pytest.raises(ValueError, match="left padded"):
        engine.generate(ids, mask.flip(1), SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="shape"):
        engine.generate(ids, mask[:, 1:], SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="integer"):
        engine.generate(ids.float(), mask, SamplingParams(max_new_tokens=4))
    for kw in (dict(max_new_tokens=0), dict(max_new_tokens=4, temperature=0.0), dict(max_new_tokens=4, top_k=-1),
               dict(max_new_tokens=4, top_p=0.0), dict(max_new_tokens=4, min_new_tokens=5),
               dict(max_new_tokens=4, stop_token_ids=(-1,))):
        with pytest.raises(ValueError):
            SamplingParams(**kw)
    with pytest.raises(ValueError, match="pad_token_id"):
        HybridEngine(model, pad_token_id=V, max_batch_size=4, max_seq_len=16)
    with pytest.raises(ValueError, match="max_batch_size"):
        HybridEngine(model, pad_token_id=PAD, max_batch_size=0, max_seq_len=16)
    with pytest.raises(ValueError, match="causal LM"):
        HybridEngine(torch.nn.Linear(2, 2), pad_token_id=PAD, max_batch_size=4, max_seq_len=16)
    # a QA pass: ids outside the vocabulary, non-0/1 masks, badly typed sampling parameters,
    # temperatures that overflow float32, seeds past int64, and more positions than GPT-2 has
    oov = ids.clone()
    oov[1, -1] = V + 3
    with pytest.raises(ValueError, match=r"input_ids\[1, 8\] = %d is outside the vocabulary" % (V + 3)):
        engine.generate(oov, mask, SamplingParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        engine.generate(ids, mask.float() * 0.5 + 0.5, SamplingParams(max_new_tokens=4))
    for kw, msg in ((dict(temperature=None), "temperature must be a number"),
                    (dict(temperature="hot"), "temperature must be a number"),
                    (dict(temperature=1e-40), "temperature must be finite and >= 1e-06"),
                    (dict(do_sample="no"), "do_sample must be True or False"),
                    (dict(top_k=True), "top_k must be an int"), (dict(max_new_tokens=True), "max_new_tokens must be"),
                    (dict(stop_token_ids="ab"), "stop_token_ids must be"),
                    (dict(eos_token_id=[1, None]), "eos_token_id: token ids must be ints"),
                    (dict(seed=2**63), r"seed must be an int in \[0, 2\*\*63\)")):
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**{"max_new_tokens": 4, **kw})
    assert SamplingParams(max_new_tokens=4, eos_token_id=torch.tensor(3), stop_token_ids=5).stop_ids() == (3, 5)
    with pytest.raises(ValueError, match="max_seq_len 129 exceeds the model's 128 learned positions"):
        HybridEngine(_model("gpt2"), pad_token_id=PAD, max_batch_size=4, max_seq_len=129)
    with pytest.warns(UserWarning, match="exceeds the model's max_position_embeddings 128"):  # rotary: a warning
        HybridEngine(_model("llama"), pad_token_id=PAD, max_batch_size=4, max_seq_len=129)
    # -100 fillers at padded positions are never attended to: replaced by the pad id, not an error
    filled = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    p = SamplingParams(max_new_tokens=4, do_sample=False)
    a, b = engine.generate(filled, mask, p), engine.generate(ids, mask, p)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(filled, torch.where(mask.bool(), ids, -100))
    # a batch above max_batch_size is split, not truncated
    ids8, mask8 = _prompts(B=9, P=6)
    out = engine.generate(ids8, mask8, SamplingParams(max_new_tokens=4, do_sample=False))
    assert out.sequences.shape == (9, 10)
