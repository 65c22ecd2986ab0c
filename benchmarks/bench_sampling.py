"""One decode step's token choice from (B, V) logits: the engine's sampler vs the usual ways.

    python benchmarks/bench_sampling.py            # this device's default sizes, writes a JSON record
    python benchmarks/bench_sampling.py --quick    # small sizes, a smoke run
    pytest benchmarks/bench_sampling.py            # CI: each path runs once and samples a valid token

Implementations (temperature 0.7, no top-k / top-p, float32 logits):
  rlhf_fast     engine.sampling.sample_next: softmax, float64 inverse CDF with one counter-based
                uniform per row (no RNG state, no host sync), plus the token's log-prob
  hf_multinomial  Hugging Face generate's way: softmax then torch.multinomial (+ log-prob gather)
  exp_race      gpt-fast's way: argmax(probs / Exp(1) noise) with noise over the whole vocabulary
                (torch.Generator), + log-prob gather; the engine's sampler before this change
  hashed_race   the same race with counter-based (hashed) noise over the whole vocabulary: the
                first counter-based version, replaced because of its cost
Bytes: one read of the logits (B * V * 4); GB/s over that is comparable across paths.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from rlhf_fast.engine.sampling import SamplingParams, _mix32, _mul32, sample_next  # noqa: E402

T = 0.7
PARAMS = SamplingParams(max_new_tokens=1, temperature=T)


def _logprob(z, tok):
    return z.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(z, -1)


def hf_multinomial(logits, gen):
    z = logits.float() / T
    tok = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(-1)
    return tok, _logprob(z, tok)


def exp_race(logits, gen):
    z = logits.float() / T
    probs = torch.softmax(z, -1)
    q = torch.empty_like(probs).exponential_(1.0, generator=gen)
    tok = (probs / q).argmax(-1)
    return tok, _logprob(z, tok)


def hashed_race(logits, seed, rows):
    z = logits.float() / T
    probs = torch.softmax(z, -1)
    cols = torch.arange(z.shape[-1], dtype=torch.int64, device=z.device)
    row_key = _mix32((_mul32(rows & 0xFFFFFFFF, 0xC2B2AE3D) ^ (seed & 0xFFFFFFFF)) & 0xFFFFFFFF)
    x = _mix32((row_key[:, None] + _mul32(cols, 0x27D4EB2F)[None, :]) & 0xFFFFFFFF)
    x = _mix32(x ^ row_key[:, None])  # two rounds over (B, V), as that version had
    u = ((x >> 8).float() + 0.5) / 16777216.0
    tok = (probs / -torch.log(u)).argmax(-1)
    return tok, _logprob(z, tok)


def impls(B, device):
    gen = torch.Generator(device=device).manual_seed(0)
    seed, rows = torch.tensor(7, device=device), torch.arange(B, device=device)
    return {
        "rlhf_fast": lambda x: sample_next(x, PARAMS, step=3, stop_ids=None, seed=seed, rows=rows),
        "hf_multinomial": lambda x: hf_multinomial(x, gen),
        "exp_race": lambda x: exp_race(x, gen),
        "hashed_race": lambda x: hashed_race(x, seed, rows),
    }


def run_case(B, V, device, reps):
    dev = _common.device_info(device)
    logits = torch.randn(B, V, device=device) * 3
    rows = []
    for name, fn in impls(B, device).items():
        t = _common.time_fn(lambda: fn(logits), device, reps=reps)
        rows.append(_common.result_row(name, {"B": B, "V": V}, "step", t, dev, bytes_moved=B * V * 4))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        cases, reps = [(8, 1000)], 3
    elif device.type == "cuda":
        cases, reps = [(64, 32000), (64, 151936), (256, 151936)], 50
    else:
        cases, reps = [(16, 32000), (64, 32000)], 10
    rows = []
    for B, V in cases:
        rows += run_case(B, V, device, reps)
    flat = [{**r, **r["case"]} for r in rows]
    _common.print_table(flat, ["impl", "B", "V", "p50_ms", "gbps", "pct_peak_bandwidth"])
    for B, V in cases:
        sel = {r["impl"]: r["p50_ms"] for r in flat if r["B"] == B and r["V"] == V}
        print(f"B={B} V={V}: rlhf_fast vs " + ", ".join(f"{k} {v / sel['rlhf_fast']:.2f}x" for k, v in sel.items()
                                                         if k != "rlhf_fast"))
    if not args.no_save:
        print("record:", _common.write_record("sampling", device, {"cases": cases, "reps": reps}, rows))
    return rows


def test_bench_sampling_paths_sample_valid_tokens():
    B, V = 8, 50
    logits = torch.randn(B, V)
    logits[:, :5] = 20.0  # nearly all mass on the first five tokens
    for name, fn in impls(B, torch.device("cpu")).items():
        tok, lp = fn(logits)
        assert tok.shape == (B,) and (tok < 5).all(), name
        expected = torch.log_softmax(logits / T, -1).gather(-1, tok[:, None]).squeeze(-1)
        torch.testing.assert_close(lp, expected, rtol=0, atol=1e-5)
    rows = main(["--quick", "--no-save"])
    assert {r["impl"] for r in rows} == {"rlhf_fast", "hf_multinomial", "exp_race", "hashed_race"}


if __name__ == "__main__":
    main()
