"""The sampler and the filtered log-prob ops at the vocabularies users run (issue 35), one thread.

    python benchmarks/bench_sampler_real.py           # V = 151,936 and 128,256, B = 64, N = 512; a JSON record
    python benchmarks/bench_sampler_real.py --quick   # small sizes, a smoke run
    pytest benchmarks/bench_sampler_real.py           # CI: each path runs once on small shapes

Per decode step (B rows of V logits, temperature 0.7), for top-p 1 / 0.9 and top-k 20:
  rlhf_fast        engine.sampling.sample_next (torch.ops.rlhf_fast.sample_tokens: no sort, no
                   float64 copy of the vocabulary)
  sort_cumsum      the sampler before issue 35: float32 filter by a stable sort + cumsum, float64
                   softmax cumsum for the inverse CDF
  hf_warpers       Hugging Face generate's way: TopK / TopP warpers (a sort), softmax, multinomial
  log_softmax      torch.log_softmax over the same logits: the yardstick of the issue
Per log-prob batch (N rows of V logits, labels):
  gather           rlhf_fast.ops.gather_logprobs unfiltered, and with top-p 0.9 / top-k 20
Logits: "flat" = randn (a random-init model: top-p 0.9 keeps ~40 % of V), "mid" = 2 * randn and
"peaked" = 5 * randn (a trained model's confident steps: top-p 0.9 keeps a few tokens); they take
different ways in csrc/kept_cut.h (each gather row records how many rows took which way,
``rows_by_way``). Bytes: one read of the logits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from rlhf_fast import ops  # noqa: E402
from rlhf_fast.engine.sampling import SamplingParams, counter_uniform, sample_next  # noqa: E402

T = 0.7
FILTERS = {"p1": (0, 1.0), "p0.9": (0, 0.9), "k20": (20, 1.0)}
SCALES = {"flat": 1.0, "mid": 2.0, "peaked": 5.0}


def sort_cumsum(logits, top_k, top_p, seed, rows):
    """The engine's sampler before issue 35 (a replica of its code at commit 0938486)."""
    z = logits.float() / T
    V = z.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        remove_sorted = before >= top_p
        remove_sorted[..., 0] = False
        z = z.masked_fill(torch.zeros_like(remove_sorted).scatter_(-1, order, remove_sorted), float("-inf"))
    cdf = torch.softmax(z, dim=-1).double().cumsum(-1)
    target = counter_uniform(seed, 3, rows) * cdf[:, -1]
    tok = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1).clamp_max(V - 1)
    zs = z - z.amax(dim=-1, keepdim=True)
    return tok, zs.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(zs, dim=-1)


def hf_warpers(logits, top_k, top_p, gen):
    z = logits.float() / T
    if top_k > 0:
        z = z.masked_fill(z < torch.topk(z, top_k).values[..., -1, None], float("-inf"))
    if top_p < 1.0:
        sorted_z, idx = torch.sort(z, descending=False)
        remove = torch.softmax(sorted_z, -1).cumsum(-1) <= (1 - top_p)
        remove[..., -1:] = False
        z = z.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    tok = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(-1)
    return tok, torch.log_softmax(z, -1).gather(-1, tok[:, None]).squeeze(-1)


def sampler_rows(B, V, reps, dev):
    gen = torch.Generator().manual_seed(0)
    seed, rows_t = torch.tensor(7), torch.arange(B)
    out = []
    for dist, scale in SCALES.items():
        logits = torch.randn(B, V, generator=torch.Generator().manual_seed(1)) * scale
        base = _common.time_fn(lambda: torch.log_softmax(logits, -1), torch.device("cpu"), reps=reps)
        case = {"B": B, "V": V, "logits": dist}
        out.append(_common.result_row("log_softmax", case, "step", base, dev, bytes_moved=B * V * 4))
        for fname, (k, p) in FILTERS.items():
            params = SamplingParams(max_new_tokens=8, temperature=T, top_k=k, top_p=p)
            impls = {
                "rlhf_fast": lambda: sample_next(logits, params, step=3, stop_ids=None, seed=seed, rows=rows_t),
                "sort_cumsum": lambda: sort_cumsum(logits, k, p, seed, rows_t),
                "hf_warpers": lambda: hf_warpers(logits, k, p, gen),
            }
            for name, fn in impls.items():
                t = _common.time_fn(fn, torch.device("cpu"), reps=reps)
                out.append(_common.result_row(name, {**case, "filter": fname}, "step", t, dev, bytes_moved=B * V * 4,
                                              vs_log_softmax=round(t["p50_ms"] / base["p50_ms"], 3)))
    return out


WAYS = ("none", "candidates", "bracket", "row", "histogram")  # csrc/kept_cut.h Found (kept_cut_path; -1: no C++ kernel)


def logprob_rows(N, V, reps, dev):
    out = []
    labels = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(2))
    for dist, scale in SCALES.items():
        logits = torch.randn(N, V, generator=torch.Generator().manual_seed(3)) * scale
        case = {"N": N, "V": V, "logits": dist}
        base = _common.time_fn(lambda: ops.gather_logprobs(logits, labels, temperature=T), torch.device("cpu"), reps=reps)
        out.append(_common.result_row("gather", {**case, "filter": "p1"}, "fwd", base, dev, bytes_moved=N * V * 4))
        for fname, (k, p) in FILTERS.items():
            if fname == "p1":
                continue
            t = _common.time_fn(lambda: ops.gather_logprobs(logits, labels, temperature=T, top_k=k, top_p=p),
                                torch.device("cpu"), reps=reps)
            paths = torch.ops.rlhf_fast.kept_cut_path(logits, T, k, p)
            ways = paths.bincount(minlength=5).tolist() if bool((paths >= 0).all()) else None
            out.append(_common.result_row("gather", {**case, "filter": fname}, "fwd", t, dev, bytes_moved=N * V * 4,
                                          vs_unfiltered=round(t["p50_ms"] / base["p50_ms"], 3),
                                          rows_by_way=dict(zip(WAYS, ways)) if ways else None))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    dev = _common.device_info(torch.device("cpu"))
    rows = []
    with _common.torch_threads(args.threads):
        if args.quick:
            cases, reps = [(8, 2000, 16)], 2
        else:
            cases, reps = [(64, 151_936, 512), (64, 128_256, 512)], 7
        for B, V, N in cases:
            rows += sampler_rows(B, V, reps, dev)
            rows += logprob_rows(N, V, reps, dev)
    flat = [{**r, **r["case"]} for r in rows]
    _common.print_table(flat, ["impl", "B", "N", "V", "logits", "filter", "p50_ms", "vs_log_softmax", "vs_unfiltered",
                               "rows_by_way"])
    if not args.no_save:
        print("record:", _common.write_record("sampler_real", torch.device("cpu"),
                                              {"cases": cases, "reps": reps, "threads": args.threads,
                                               "temperature": T}, rows))
    return rows


def test_bench_sampler_real_quick():
    rows = main(["--quick", "--no-save"])
    assert {r["impl"] for r in rows} == {"rlhf_fast", "sort_cumsum", "hf_warpers", "log_softmax", "gather"}


if __name__ == "__main__":
    main()
