"""The engine's interfaces (``engine/generator.py``): ``HybridEngine`` is a ``Generator``;
``make_generator`` builds one; a decode path registered from outside the package (a third backend
in its own file: here, this one) is chosen by name and gets the chunk contract the built-in paths
get (checked inputs, chunks of at most ``max_batch_size`` rows, the rows' offsets in the call); the
"auto" rule; a path that cannot run with a model fails at construction with its reason."""

from __future__ import annotations

import inspect

import pytest
import torch

from rlhf_fast.engine import (
    DECODERS,
    DecoderContext,
    EngineStats,
    Generator,
    HybridEngine,
    KVBufferPool,
    SamplingParams,
    decode_modes,
    make_generator,
)
from rlhf_fast.engine.compiled import CompiledDecoder
from rlhf_fast.engine.eager import EagerDecoder
from rlhf_fast.engine.generator import Decoder, auto_path, build_decoders

from test_engine import PAD, V, _model, _prompts


class ArithmeticDecoder:
    """A third backend: row r of the call emits token (r + 3 + t) % V at step t, with log-prob
    -1, and stops after (r % 5) + 2 tokens (pad after). Every built instance keeps its calls."""

    instances: list["ArithmeticDecoder"] = []

    def __init__(self, ctx: DecoderContext):
        self.ctx, self.calls, self.ids = ctx, [], []
        ArithmeticDecoder.instances.append(self)

    @classmethod
    def unsupported(cls, ctx: DecoderContext):
        return "cannot run on gpt2 (a test of the construction-time check)" if ctx.config.model_type == "gpt2" else None

    def decode(self, ids, mask, params, stop, seed, row_offset, rows):
        self.calls.append((tuple(ids.shape), mask.dtype, row_offset, rows))
        self.ids.append(ids)
        R = params.max_new_tokens
        r = torch.arange(ids.shape[0])[:, None] + row_offset
        t = torch.arange(R)[None, :]
        valid = t < (r % 5) + 2
        tokens = torch.where(valid, (r + 3 + t) % V, self.ctx.pad_token_id)
        self.ctx.stats.forwards += 1
        return tokens, valid, torch.where(valid, -1.0, 0.0)


DECODERS.register("test_arithmetic")(ArithmeticDecoder)


def test_hybrid_engine_is_a_generator():
    engine = HybridEngine(_model("llama"), pad_token_id=PAD, max_batch_size=4, max_seq_len=32)
    assert isinstance(engine, Generator)
    assert not isinstance(object(), Generator)
    for name in ("generate", "on_weights_updated"):  # the same parameters, not only the same names
        assert list(inspect.signature(getattr(HybridEngine, name)).parameters) == \
            list(inspect.signature(getattr(Generator, name)).parameters)
    for decoder in (*engine._decoders.values(), ArithmeticDecoder(engine._ctx)):
        assert isinstance(decoder, Decoder)
    ids, mask = _prompts(B=4)
    p = SamplingParams(max_new_tokens=6, seed=3)
    before = engine.generate(ids, mask, p)
    engine.on_weights_updated()  # live weights: nothing to sync, the next call is the same
    assert torch.equal(engine.generate(ids, mask, p).sequences, before.sequences)


def test_make_generator_builds_the_engine_with_its_arguments():
    model = _model("qwen2")
    ids, mask = _prompts(B=6)
    p = SamplingParams(max_new_tokens=10, seed=5, eos_token_id=7)
    for decode in ("eager", "static", "auto"):
        gen = make_generator(model, pad_token_id=PAD, max_batch_size=4, max_seq_len=32, decode=decode)
        assert isinstance(gen, HybridEngine) and isinstance(gen, Generator) and gen.decode == decode
        same = HybridEngine(model, pad_token_id=PAD, max_batch_size=4, max_seq_len=32, decode=decode)
        a, b = gen.generate(ids, mask, p), same.generate(ids, mask, p)
        assert torch.equal(a.sequences, b.sequences) and torch.equal(a.logprobs, b.logprobs)
        assert gen.stats == same.stats
    gen = make_generator(model, pad_token_id=PAD, max_batch_size=4, max_seq_len=32, sync_every=3,
                         compact_finished=False, kv_bucket=16, compile_mode="default")
    assert (gen.sync_every, gen.compact_finished, gen._ctx.kv_bucket, gen._ctx.compile_mode) == (3, False, 16, "default")
    with pytest.raises(ValueError, match="kv_bucket must be None or a positive multiple of 16"):
        make_generator(model, pad_token_id=PAD, max_batch_size=4, max_seq_len=32, kv_bucket=8)


def test_a_registered_third_backend_generates_through_the_factory():
    assert "test_arithmetic" in decode_modes()
    ArithmeticDecoder.instances.clear()
    ids, mask = _prompts(B=11, P=6)
    ids[3, 0] = -100  # a filler at a padded position: the engine's checks replace it before any decoder
    mask[3, 0] = 0
    gen = make_generator(_model("llama"), pad_token_id=PAD, max_batch_size=4, max_seq_len=20, decode="test_arithmetic")
    out = gen.generate(ids, mask, SamplingParams(max_new_tokens=8))
    (decoder,) = ArithmeticDecoder.instances
    # chunks of 4, 4 and 3 rows, each told its offset in the call and the chunk size
    assert decoder.calls == [((4, 6), torch.bool, 0, 4), ((4, 6), torch.bool, 4, 4), ((3, 6), torch.bool, 8, 4)]
    assert gen.stats.decode == "test_arithmetic" and gen.stats.calls == 1 and gen.stats.forwards == 3
    r = torch.arange(11)[:, None]
    t = torch.arange(6)[None, :]  # R trimmed to the longest response, (4 % 5) + 2 = 6 tokens
    valid = t < (r % 5) + 2
    assert torch.equal(out.response_mask, valid)
    assert torch.equal(out.responses, torch.where(valid, (r + 3 + t) % V, PAD))
    assert torch.equal(torch.cat(decoder.ids), torch.where(mask.bool(), ids, PAD))
    assert torch.equal(out.sequences[:, :6], torch.where(mask.bool(), ids, PAD))
    assert torch.equal(out.logprobs, torch.where(valid, -1.0, 0.0))
    # the construction-time check names the path and its reason
    with pytest.raises(ValueError, match=r"decode='test_arithmetic' cannot run on gpt2"):
        make_generator(_model("gpt2"), pad_token_id=PAD, max_batch_size=4, max_seq_len=20, decode="test_arithmetic")


def _ctx(model, **kw) -> DecoderContext:
    return DecoderContext(lm=model, config=model.config, pad_token_id=PAD, max_seq_len=32,
                          kv_pool=KVBufferPool(4, 32), stats=EngineStats(), **kw)


def test_auto_rule_and_construction_checks():
    model = _model("llama")
    built = build_decoders("auto", _ctx(model))
    assert set(built) == {"eager", "compiled"}
    assert isinstance(built["compiled"], CompiledDecoder) and built["compiled"].fallback is built["eager"]
    assert isinstance(built["eager"], EagerDecoder)
    stats = EngineStats()
    assert auto_path(torch.device("cuda"), built, stats) == "compiled"
    assert auto_path(torch.device("cpu"), built, stats) == "eager"
    stats.compile_error = "RuntimeError: no code generator here"
    assert auto_path(torch.device("cuda"), built, stats) == "eager"
    # ZeRO-3 parameters: "auto" leaves out the compiled path, decode="compiled" refuses with the reason
    zero3 = _ctx(model, zero3=True)
    assert set(build_decoders("auto", zero3)) == {"eager"}
    assert auto_path(torch.device("cuda"), build_decoders("auto", zero3), EngineStats()) == "eager"
    with pytest.raises(ValueError, match="decode='compiled' cannot trace ZeRO-3 partitioned parameters"):
        build_decoders("compiled", zero3)
    assert set(build_decoders("static", zero3)) == {"static"}
    # a strict compiled decoder has no fallback
    assert build_decoders("compiled", _ctx(model))["compiled"].fallback is None
    with pytest.raises(ValueError, match=r"decode must be one of \('auto', 'eager', 'static', 'compiled'.*"
                                         r"'test_arithmetic'.*got 'vllm'"):
        build_decoders("vllm", _ctx(model))


def test_a_decoder_declares_its_auto_preference(monkeypatch):
    """"auto" reads each decoder's declared preference, never its name: a decoder registered from this
    file that prefers the CPU (rank above the base) is built under "auto" and chosen on a CPU, not on
    CUDA (where "compiled" ranks higher); without a preference it is never built under "auto"."""
    from rlhf_fast.engine.generator import AutoPreference

    model = _model("llama")
    assert "test_arithmetic" not in build_decoders("auto", _ctx(model))  # ArithmeticDecoder declares none
    monkeypatch.setattr(ArithmeticDecoder, "auto", AutoPreference(devices=("cpu",), rank=5), raising=False)
    built = build_decoders("auto", _ctx(model))
    assert set(built) == {"eager", "compiled", "test_arithmetic"}
    assert auto_path(torch.device("cpu"), built, EngineStats()) == "test_arithmetic"
    assert auto_path(torch.device("cuda"), built, EngineStats()) == "compiled"
    # a second "any device" decoder makes the base ambiguous: named, not guessed
    monkeypatch.setattr(ArithmeticDecoder, "auto", AutoPreference(devices=("*",), rank=5), raising=False)
    with pytest.raises(ValueError, match=r"exactly one registered decoder .* found \['eager', 'test_arithmetic'\]"):
        build_decoders("auto", _ctx(model))


def test_registry_is_shared_with_algos():
    from rlhf_fast._registry import Registry
    from rlhf_fast.algos.registry import Registry as AlgosRegistry

    assert AlgosRegistry is Registry and type(DECODERS) is Registry
    with pytest.raises(ValueError, match="decode path 'eager' is already registered"):
        DECODERS.register("eager")(ArithmeticDecoder)
