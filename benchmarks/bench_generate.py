"""Generation throughput: rlhf_fast HybridEngine vs Hugging Face ``generate``.

    python benchmarks/bench_generate.py            # this device's default size, writes a JSON record
    python benchmarks/bench_generate.py --quick    # tiny model, a smoke run
    pytest benchmarks/bench_generate.py            # CI: one tiny run, outputs checked equal

Implementations (same model, batch, prompts, response length; greedy, so outputs must agree):
  engine           HybridEngine(decode="eager"): engine-owned KV buffers, filled-prefix attention,
                   finished rows compacted away
  engine_compiled  HybridEngine(decode="compiled"): static cache, the decode step compiled by
                   torch.compile (mode="reduce-overhead": one CUDA graph per step on a GPU);
                   compile time is excluded (warm-up calls)
  engine_compiled_kv  the same with kv_bucket=64 (16 on CPU): each step attends over the filled
                   length rounded up to the bucket instead of the whole static cache
  hf_dynamic       model.generate (DynamicCache: KV concatenated every step)
  hf_static        model.generate(cache_implementation="static"); on CUDA Hugging Face compiles
                   its decode forward itself (reduce-overhead), on CPU it runs eagerly
Cases: "fixed" ignores EOS (every row decodes R tokens, "N Implementation Details" #4); "eos"
picks an EOS that rows emit at different steps (the engine drops finished rows, HF keeps them);
"groups" is group sampling (GRPO / DAPO rollouts): B / GROUP prompts, each repeated GROUP times
next to each other, sampled (seed 0), timed for
  engine                      one prefill per prompt, its KV broadcast to the group's rows
                              (engine/prefix_share.py)
  engine_no_shared_prefill    HybridEngine(share_prefill=False): every row prefilled
  hf_dynamic                  model.generate(num_return_sequences=GROUP) on the B / GROUP prompts
                              (HF expands the prompts before its prefill)
the engine's two rows must be token-identical (same_as_engine); "prefill_rows" is the rows the
engine's prefill ran.

tokens/s counts generated (valid) tokens over prefill + decode wall time. Roofline: a decode
step must read every weight once and the KV cache of every live row,
    bytes/step = weight bytes + B * 2 * layers * kv_heads * head_dim * L_avg * itemsize,
so the best possible tokens/s is B * bandwidth / bytes_per_step (L_avg = P + R/2; prefill
ignored); pct_roofline = measured / that. A static cache attends over all P + R positions, so it
reads up to (P + R) / (P + R/2) times the KV bytes this counts. On a CPU with a batch of 16 the
matmuls are partly compute-bound, so the roofline is an upper bound there, not a target.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from rlhf_fast.engine import HybridEngine, SamplingParams  # noqa: E402
from rlhf_fast.models import load_causal_lm  # noqa: E402
from rlhf_fast.tasks import tiny_config  # noqa: E402

PAD = 0
GROUP = 8  # samples per prompt in the "groups" case (TRL num_generations 8)

SIZES = {
    # name: (arch, config overrides, batch, prompt, new tokens)
    "quick": ("llama", dict(vocab_size=512, size="test"), 8, 16, 16),
    "cpu": ("llama", dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, intermediate_size=704, max_position_embeddings=512), 16, 32, 48),
    "gpu": ("llama", dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
                          num_key_value_heads=16, intermediate_size=2816, max_position_embeddings=1024), 64, 128, 256),
}


def build(size: str, device, dtype):
    arch, kw, B, P, R = SIZES[size]
    kw = dict(kw)
    cfg_size = kw.pop("size", "test")
    cfg = tiny_config(arch, size=cfg_size, **kw)
    model = load_causal_lm(cfg, seed=0, dtype=dtype).to(device).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (B, P), generator=g)
    lengths = torch.randint(P // 2, P + 1, (B,), generator=g)
    lengths[0] = P
    mask = (torch.arange(P)[None] >= (P - lengths)[:, None]).long()
    return model, ids.masked_fill(mask == 0, PAD).to(device), mask.to(device), R


def roofline_tokens_per_s(model, B, P, R, bandwidth_gbps):
    cfg = model.config
    item = next(model.parameters()).element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    kv_bytes = B * 2 * cfg.num_hidden_layers * kv_heads * head_dim * (P + R / 2) * item
    return B * bandwidth_gbps * 1e9 / (weight_bytes + kv_bytes), weight_bytes, kv_bytes


def pick_eos(model, ids, mask, R):
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=R, do_sample=False, pad_token_id=PAD)
    gen = gen[:, ids.shape[1]:].cpu()
    best, score = None, -1
    for tok in gen.unique().tolist():
        first = {int((row == tok).nonzero()[0]) for row in gen if (row == tok).any()}
        if tok != PAD and len(first) > score:
            best, score = tok, len(first)
    return best


def run(size: str, device: torch.device, dtype=torch.float32, reps: int = 5, warmup: int = 0, cases=("fixed", "eos"),
        compiled: bool = True):
    model, ids, mask, R = build(size, device, dtype)
    B, P = ids.shape
    dev = _common.device_info(device)
    ideal, wbytes, kvbytes = roofline_tokens_per_s(model, B, P, R, dev["peak_bandwidth_gbps"] or 0)
    engines = {"engine": HybridEngine(model, pad_token_id=PAD, max_batch_size=B, max_seq_len=P + R, decode="eager")}
    if compiled:
        engines["engine_compiled"] = HybridEngine(model, pad_token_id=PAD, max_batch_size=B, max_seq_len=P + R,
                                                  decode="compiled")
        engines["engine_compiled_kv"] = HybridEngine(model, pad_token_id=PAD, max_batch_size=B, max_seq_len=P + R,
                                                     decode="compiled", kv_bucket=64 if device.type == "cuda" else 16)
    rows = []
    if "groups" in cases:
        rows += _groups_case(model, ids, mask, R, size, device, dtype, dev, ideal, reps=reps, warmup=warmup)
    for case in [c for c in cases if c != "groups"]:
        eos = pick_eos(model, ids, mask, R) if case == "eos" else None
        hf_kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=R, do_sample=False, pad_token_id=PAD,
                     eos_token_id=eos)
        params = SamplingParams(max_new_tokens=R, do_sample=False, eos_token_id=eos)
        impls = {name: (lambda e=e: e.generate(ids, mask, params).sequences) for name, e in engines.items()}
        impls["hf_dynamic"] = lambda: model.generate(**hf_kw)
        impls["hf_static"] = lambda: model.generate(**hf_kw, cache_implementation="static")
        seqs, first_s = {}, {}
        with torch.no_grad():
            for name, fn in list(impls.items()):  # the first call: also the first warm-up (compiles)
                t0 = time.perf_counter()
                try:
                    seqs[name] = fn()
                except Exception as exc:  # a path that fails here is recorded as failed, the others still run
                    print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
                    rows.append({"impl": name, "case": {"size": size, "case": case}, "pass": "generate",
                                 "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
                    del impls[name]
                    continue
                first_s[name] = round(time.perf_counter() - t0, 2)
            times = _interleaved_times(impls, device, reps=reps, warmup=warmup)
        for name in impls:
            ref = seqs.get("engine")
            same = None if ref is None else bool(seqs[name].shape == ref.shape and torch.equal(seqs[name].cpu(), ref.cpu()))
            n_tokens = int(_valid_tokens(seqs[name][:, P:], eos))
            tps = n_tokens / (times[name]["p50_ms"] / 1e3)
            rows.append(_common.result_row(
                name, {"size": size, "case": case, "B": B, "P": P, "R": R, "dtype": str(dtype).replace("torch.", "")},
                "generate", times[name], dev, tokens=n_tokens, tokens_per_s=round(tps, 1),
                pct_roofline=round(100 * tps / ideal, 1) if ideal else None, same_as_engine=same,
                first_call_s=first_s[name],
            ))
    config = {"size": size, "model": SIZES[size][:2].__repr__(), "warmup_calls": 1 + warmup, "params_m": round(wbytes / 4 / 1e6 if dtype == torch.float32
              else wbytes / 2 / 1e6, 2), "weight_mb": round(wbytes / 2**20, 1), "kv_mb_per_step": round(kvbytes / 2**20, 2),
              "roofline_tokens_per_s": round(ideal, 1), "reps": reps,
              "torch_threads": torch.get_num_threads()}
    return rows, config


def _groups_case(model, ids, mask, R, size, device, dtype, dev, ideal, *, reps, warmup):
    """Group sampling: B / GROUP prompts x GROUP samples, with and without the shared prefill."""
    B, P = ids.shape
    k = min(GROUP, B)
    gi, gm = ids[: B // k].repeat_interleave(k, 0), mask[: B // k].repeat_interleave(k, 0)  # (B, P) runs of k
    params = SamplingParams(max_new_tokens=R, do_sample=True, temperature=1.0, seed=0)
    engines = {name: HybridEngine(model, pad_token_id=PAD, max_batch_size=B, max_seq_len=P + R, decode="eager",
                                  share_prefill=share)
               for name, share in (("engine", True), ("engine_no_shared_prefill", False))}
    impls = {name: (lambda e=e: e.generate(gi, gm, params).sequences) for name, e in engines.items()}
    impls["hf_dynamic"] = lambda: model.generate(input_ids=ids[: B // k], attention_mask=mask[: B // k],
                                                 max_new_tokens=R, do_sample=True, num_return_sequences=k,
                                                 pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        seqs, first_s = {}, {}
        for name, fn in impls.items():
            t0 = time.perf_counter()
            seqs[name] = fn()
            first_s[name] = round(time.perf_counter() - t0, 2)
        prefill = {name: e.stats.prefill_rows for name, e in engines.items()}  # after one call each
        times = _interleaved_times(impls, device, reps=reps, warmup=warmup)
    rows = []
    for name in impls:
        same = (bool(torch.equal(seqs[name], seqs["engine"])) if name.startswith("engine") else None)
        n_tokens = int(seqs[name][:, P:].numel())
        tps = n_tokens / (times[name]["p50_ms"] / 1e3)
        rows.append(_common.result_row(
            name, {"size": size, "case": "groups", "B": B, "P": P, "R": R, "group": k,
                   "dtype": str(dtype).replace("torch.", "")},
            "generate", times[name], dev, tokens=n_tokens, tokens_per_s=round(tps, 1),
            pct_roofline=round(100 * tps / ideal, 1) if ideal else None, same_as_engine=same,
            first_call_s=first_s[name], prefill_rows=prefill.get(name),
        ))
    return rows


def _interleaved_times(impls, device, *, reps, warmup):
    """p20 / p50 / p80 ms per impl, the impls timed round-robin within each repetition so that
    load from other processes on a shared machine hits all of them alike."""
    import statistics

    for _ in range(warmup):
        for fn in impls.values():
            fn()
    samples = {name: [] for name in impls}
    for _ in range(reps):
        for name, fn in impls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # CPU-GPU sync point: timing
            samples[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in samples.items():
        q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else ts * 9
        out[name] = {"p20_ms": q[1], "p50_ms": statistics.median(ts), "p80_ms": q[7], "reps": len(ts)}
    return out


def _valid_tokens(resp, eos):
    if eos is None:
        return resp.numel()
    hit = resp == eos
    first = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.full_like(hit[:, 0], resp.shape[1], dtype=torch.long))
    return first.sum()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-save", action="store_true", help="do not write a JSON record")
    p.add_argument("--no-compile", action="store_true", help="leave out engine_compiled (saves the compile time)")
    p.add_argument("--cases", default="fixed,eos,groups", help="comma-separated: fixed, eos, groups")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = "quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = args.reps or (3 if args.quick else 5)
    # CUDA graphs are recorded on the second or third call of a shape: two more warm-ups there
    cases = tuple(c for c in args.cases.split(",") if c)
    if not cases or set(cases) - {"fixed", "eos", "groups"}:
        raise SystemExit(f"--cases: a comma-separated subset of fixed, eos, groups, got {args.cases!r}")
    rows, config = run(size, device, dtype, reps=reps, warmup=2 if device.type == "cuda" else 0,
                       compiled=not args.no_compile, cases=cases)
    flat = [{**r, **r["case"]} for r in rows if "error" not in r]
    _common.print_table(flat, ["impl", "case", "B", "P", "R", "p50_ms", "tokens_per_s", "pct_roofline", "same_as_engine",
                               "first_call_s"])
    print("config:", config)
    for case in {r["case"] for r in flat}:
        sel = {r["impl"]: r["tokens_per_s"] for r in flat if r["case"] == case}
        for mine in [k for k in sel if k.startswith("engine")]:
            print(f"{case}: {mine} vs " + ", ".join(f"{k} {sel[mine] / v:.2f}x" for k, v in sel.items()
                                                     if not k.startswith("engine")))
    if not args.no_save:
        print("record:", _common.write_record("generate", device, config, rows))
    return rows


def test_bench_generate_quick():
    # engine_compiled is left out here (compile time); tests/test_engine_static.py covers it
    rows = main(["--quick", "--no-save", "--reps", "1", "--no-compile", "--cases", "fixed,eos"])
    assert {r["impl"] for r in rows} == {"engine", "hf_dynamic", "hf_static"}
    assert all("error" not in r and r["same_as_engine"] and r["tokens_per_s"] > 0 for r in rows)


def test_bench_generate_groups_quick():
    """The groups case: the shared prefill runs one row per prompt and samples the same tokens."""
    rows = main(["--quick", "--no-save", "--reps", "1", "--no-compile", "--cases", "groups"])
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"engine", "engine_no_shared_prefill", "hf_dynamic"}
    B, k = by["engine"]["case"]["B"], by["engine"]["case"]["group"]
    assert by["engine"]["prefill_rows"] == B // k and by["engine_no_shared_prefill"]["prefill_rows"] == B
    assert by["engine_no_shared_prefill"]["same_as_engine"] and all(r["tokens_per_s"] > 0 for r in rows)


if __name__ == "__main__":
    main()
