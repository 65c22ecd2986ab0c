"""The static / compiled decode path of HybridEngine on CPU (``engine/static.py``).

- static cache, eager step: greedy identical to Hugging Face ``generate`` on four architectures,
  and sampling (temperature, top-k, top-p, min_new_tokens, EOS) identical to the eager loop for
  the same seed, since the noise is a function of (seed, step, row);
- the decode step traced by ``torch.compile(fullgraph=True)`` on all four architectures (no graph
  break: the condition for one CUDA graph per step), then run by inductor on one (slow test):
  same tokens as the eager loop, no recompilation on the next call, live weights;
- a compiler failure under ``decode="auto"`` falls back to the eager loop with the error kept;
- the counter-based noise: uniform, independent across steps / rows / seeds, row-local;
- bad configurations fail at construction with the reason.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast.engine import HybridEngine, SamplingParams
from rlhf_fast.engine.sampling import counter_uniform
from rlhf_fast.engine.static import StaticDecoder
from rlhf_fast.models import load_causal_lm
from rlhf_fast.tasks import ARCHITECTURES, tiny_config

from test_engine import PAD, V, _hf_greedy, _model, _pick_eos, _prompts

N = 20
SAMPLE = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, min_new_tokens=3, seed=11)


def _case(arch):
    model = _model(arch, initializer_range=0.3).eval()
    ids, mask = _prompts()
    eos = _pick_eos(_hf_greedy(model, ids, mask, N, None)[:, ids.shape[1] :])
    return model, ids, mask, eos


def _engine(model, decode, **kw):
    return HybridEngine(model, pad_token_id=PAD, max_batch_size=16, max_seq_len=48, decode=decode, **kw)


# max_seq_len 48, prompts 9 wide: with kv_bucket 16 the steps attend over 16, 32, then all 48 positions
WINDOWS = [None, 16]


def _assert_same(a, b, lp_tol=1e-4):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.response_mask, b.response_mask)
    assert (a.logprobs - b.logprobs).abs().max().item() <= lp_tol


@pytest.mark.parametrize("kv_bucket", WINDOWS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_static_path_matches_hf_greedy_and_eager_sampling(arch, kv_bucket):
    model, ids, mask, eos = _case(arch)
    expected = _hf_greedy(model, ids, mask, N, eos)
    eager, static = _engine(model, "eager"), _engine(model, "static", kv_bucket=kv_bucket)
    greedy = SamplingParams(max_new_tokens=N, do_sample=False, eos_token_id=eos)
    out = static.generate(ids, mask, greedy)
    assert static.stats.decode == "static"
    assert torch.equal(out.sequences, expected)
    assert out.response_mask.sum(1).min() < out.response_mask.shape[1]  # some rows stopped early
    _assert_same(out, eager.generate(ids, mask, greedy))
    sampled = SamplingParams(max_new_tokens=N, eos_token_id=eos, **SAMPLE)
    a, b = static.generate(ids, mask, sampled), eager.generate(ids, mask, sampled)
    _assert_same(a, b)
    assert not torch.equal(a.sequences, out.sequences)  # it did sample
    # min_new_tokens: no stop token among the first 3
    assert not (a.responses[:, :3] == eos).any()
    if kv_bucket:
        assert sorted(next(iter(static._static._states.values())).windows) == [16, 32]


def test_static_path_reuses_its_buffers_and_splits_large_batches():
    model, ids, mask, eos = _case("llama")
    static = HybridEngine(model, pad_token_id=PAD, max_batch_size=4, max_seq_len=48, decode="static")
    eager = HybridEngine(model, pad_token_id=PAD, max_batch_size=16, max_seq_len=48, decode="eager")
    p = SamplingParams(max_new_tokens=N, eos_token_id=eos, **SAMPLE)
    a = static.generate(ids, mask, p)  # 10 rows: chunks of 4, 4, 2
    _assert_same(a, eager.generate(ids, mask, p))  # noise follows the row, not the chunk
    states = dict(static._static._states)
    ptrs = {k: st.cache.layers[0].keys.data_ptr() for k, st in states.items()}
    static.generate(ids, mask, p)
    assert static._static._states.keys() == states.keys()
    assert {k: st.cache.layers[0].keys.data_ptr() for k, st in static._static._states.items()} == ptrs
    assert static._static.buffer_bytes() > 0


@pytest.mark.parametrize("kv_bucket", WINDOWS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decode_step_traces_as_one_graph(arch, kv_bucket):
    """fullgraph=True raises on any graph break; the "eager" backend runs the traced graph
    without code generation, so this is the tracing half of the compiled path on every arch.
    With KV windows: a static trace for the first width, one symbolic-width trace for the rest."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, ids, mask, eos = _case(arch)
    compiled = _engine(model, "compiled", kv_bucket=kv_bucket)
    compiled._static.fullgraph = True
    compiled._static.compile_backend = "eager"
    p = SamplingParams(max_new_tokens=N, eos_token_id=eos, **SAMPLE)
    compiled.max_batch_size = 4  # chunks of 4, 4 and 2 rows (padded to 4 inside, trimmed on return)
    a = compiled.generate(ids, mask, p)
    assert compiled.stats.decode == "compiled" and compiled.stats.compile_error is None
    _assert_same(a, _engine(model, "eager").generate(ids, mask, p))
    assert a.sequences.shape[0] == ids.shape[0]
    assert counters["stats"]["unique_graphs"] == (2 if kv_bucket else 1)


@pytest.mark.slow
@pytest.mark.parametrize("kv_bucket", WINDOWS)
def test_inductor_compiled_step_matches_eager_and_sees_new_weights(kv_bucket):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    model, ids, mask, eos = _case("llama")
    compiled, eager = _engine(model, "compiled", kv_bucket=kv_bucket), _engine(model, "eager")
    p = SamplingParams(max_new_tokens=N, eos_token_id=eos, **SAMPLE)
    _assert_same(compiled.generate(ids, mask, p), eager.generate(ids, mask, p))
    graphs = counters["stats"]["unique_graphs"]
    # other prompts of another width, another seed, another length: the same graph
    p2 = SamplingParams(max_new_tokens=N - 5, eos_token_id=eos, **{**SAMPLE, "seed": 5})
    _assert_same(compiled.generate(ids.flip(0)[:, 2:], mask.flip(0)[:, 2:], p2),
                 eager.generate(ids.flip(0)[:, 2:], mask.flip(0)[:, 2:], p2))
    assert counters["stats"]["unique_graphs"] == graphs
    # another batch size traces once more (with windows the graph is already symbolic: the batch
    # becomes symbolic too), then reuses that graph
    _assert_same(compiled.generate(ids[3:8], mask[3:8], p), eager.generate(ids[3:8], mask[3:8], p))
    graphs += 1
    assert counters["stats"]["unique_graphs"] == graphs
    _assert_same(compiled.generate(ids[2:7], mask[2:7], p), eager.generate(ids[2:7], mask[2:7], p))
    assert counters["stats"]["unique_graphs"] == graphs
    # live weights: an in-place update (what an optimizer step does) reaches the compiled step
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    new_c, new_e = compiled.generate(ids, mask, p), eager.generate(ids, mask, p)
    _assert_same(new_c, new_e)
    assert counters["stats"]["unique_graphs"] == graphs


def test_auto_falls_back_to_eager_when_compiling_fails(caplog):
    torch._dynamo.reset()
    model, ids, mask, eos = _case("gpt2")

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no code generator here")

    engine = _engine(model, "auto")
    engine._static.compile_backend = broken_backend
    engine.decode_path = lambda device: "compiled" if engine.stats.compile_error is None else "eager"
    p = SamplingParams(max_new_tokens=N, eos_token_id=eos, **SAMPLE)
    with caplog.at_level("WARNING"):
        out = engine.generate(ids, mask, p)
    assert "no code generator here" in engine.stats.compile_error
    assert engine.stats.decode == "eager"
    assert any("eager decode loop" in r.message for r in caplog.records)
    _assert_same(out, _engine(model, "eager").generate(ids, mask, p))
    # an explicit decode="compiled" raises instead
    strict = _engine(model, "compiled")
    strict._static.compile_backend = broken_backend
    with pytest.raises(Exception, match="no code generator here"):
        strict.generate(ids, mask, p)


def test_auto_is_eager_on_cpu():
    model, ids, mask, eos = _case("llama")
    engine = _engine(model, "auto")
    engine.generate(ids, mask, SamplingParams(max_new_tokens=4, do_sample=False))
    assert engine.stats.decode == "eager"


def test_bad_decode_configuration():
    model = _model("llama")
    with pytest.raises(ValueError, match="decode must be one of"):
        _engine(model, "graphs")
    for bad in (0, 24, True, 16.0):
        with pytest.raises(ValueError, match="kv_bucket must be None or a positive multiple of 16"):
            _engine(model, "static", kv_bucket=bad)
    windowed = load_causal_lm(
        tiny_config("qwen2", vocab_size=V, size="test", use_sliding_window=True, sliding_window=4, max_window_layers=0),
        seed=0,
    )
    reason = StaticDecoder.supports(windowed.config, 48)
    assert reason is not None and "Sliding" in reason
    with pytest.raises(ValueError, match="needs a plain static KV cache"):
        _engine(windowed, "static")
    assert _engine(windowed, "auto").decode_path(torch.device("cuda")) == "eager"


def test_counter_uniforms_are_uniform_independent_and_row_local():
    rows = torch.arange(4096)
    u = counter_uniform(torch.tensor(1234), 5, rows)
    assert u.dtype == torch.float64 and 0 < u.min() and u.max() < 1
    draws = torch.stack([counter_uniform(torch.tensor(s), t, rows) for s in (1234, 99) for t in range(8)])
    assert abs(draws.mean().item() - 0.5) < 0.005 and abs(draws.var().item() - 1 / 12) < 0.002
    hist = torch.histc(draws.float(), bins=64, min=0, max=1)
    expected = draws.numel() / 64
    chi2 = (((hist - expected) ** 2) / expected).sum().item()
    assert chi2 < 120  # 63 degrees of freedom: p < 1e-5 above this

    def corr(a, b):
        return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].abs().item()

    assert corr(draws[0], draws[1]) < 0.05 and corr(draws[0], draws[8]) < 0.05  # next step / other seed
    assert corr(u[:-1], u[1:]) < 0.05  # neighbouring rows
    assert torch.equal(counter_uniform(torch.tensor(1234), 5, torch.tensor([3, 17])), u[[3, 17]])
    assert torch.equal(counter_uniform(torch.tensor(1234), torch.tensor([5]), rows), u)  # tensor step
    assert len(set(u.tolist())) == u.numel()


def test_inverse_cdf_sampling_matches_the_distribution():
    """Frequencies of many seeded draws from one filtered distribution against its probabilities."""
    from rlhf_fast.engine.sampling import filter_logits, sample_next

    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 1.5
    p = SamplingParams(max_new_tokens=1, temperature=0.8, top_k=8, top_p=0.95)
    z = filter_logits(logits / 0.8, 8, 0.95)
    probs = torch.softmax(z, -1)[0]
    n = 20000
    toks, lps = sample_next(logits.expand(n, -1), p, step=0, stop_ids=None, seed=torch.tensor(7), rows=torch.arange(n))
    freq = torch.bincount(toks, minlength=12).double() / n
    assert (freq[probs == 0] == 0).all()  # never outside top-k / top-p
    assert (freq - probs.double()).abs().max() < 4 * (probs.double() * (1 - probs.double()) / n).sqrt().max()
    assert torch.allclose(lps, torch.log_softmax(z, -1)[0, toks], atol=1e-6)
