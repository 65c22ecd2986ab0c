"""Token log-probs (+ entropy) from logits: rlhf_fast vs the reference and the peers' ways.

    python benchmarks/bench_logprob.py            # this device's default sizes, writes a JSON record
    python benchmarks/bench_logprob.py --quick    # small sizes, a smoke run
    pytest benchmarks/bench_logprob.py --benchmark-disable   # CI: every path runs once, checked

Implementations (all at temperature 1, float32 outputs):
  rlhf_fast      ops.gather_logprobs: one read of the logits, no [N, V] temporary
  reference      rlhf_fast.reference.gather_logprobs (float32 upcast, full log_softmax)
  trl_selective  TRL-style selective_log_softmax: fp32 -> gather - per-row logsumexp loop;
                 bf16/fp16 -> a Python loop of per-row log_softmax + gather
  dschat         DeepSpeed-Chat-style log_softmax(logits.float()).gather(labels)
  dschat_compile torch.compile of dschat
Filtered (the engine's sampling filter, top_k 50 / top_p 0.9: log-probs under the renormalised
kept set, issue 18):
  rlhf_fast_filtered  ops.gather_logprobs(top_k=, top_p=): the kept set from the engine's rule
                      (a sort for top-p), then the same one-pass kernel summing kept tokens only
  torch_filtered      what a peer would write: the engine's filter_logits (-inf outside), then
                      log_softmax(...).gather (an [N, V] filtered copy and a full log_softmax)
Bytes: forward reads the logits once (N*V*itemsize); forward+backward reads them twice and writes
d(logits) once. The ideal is one pass each, so GB/s over those bytes is comparable across impls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import rlhf_fast.ops as ops  # noqa: E402
import rlhf_fast.reference as ref  # noqa: E402
from rlhf_fast import _filter  # noqa: E402
from rlhf_fast.reference import peers  # noqa: E402


trl_selective = peers.trl_selective_log_softmax
dschat = peers.dschat_gather_log_probs


IMPLS = {
    "rlhf_fast": lambda x, y: ops.gather_logprobs(x, y),
    "reference": lambda x, y: ref.gather_logprobs(x, y),
    "trl_selective": trl_selective,
    "dschat": dschat,
}


TOP_K, TOP_P = 50, 0.9


def torch_filtered(x, y):
    z = _filter.filter_logits(x.float(), TOP_K, TOP_P)
    return torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


FILTERED_IMPLS = {
    "rlhf_fast_filtered": lambda x, y: ops.gather_logprobs(x, y, top_k=TOP_K, top_p=TOP_P),
    "torch_filtered": torch_filtered,
}


def _impls(with_compile: bool):
    impls = {**IMPLS, **FILTERED_IMPLS}
    if with_compile:
        impls["dschat_compile"] = torch.compile(dschat, dynamic=False)
    return impls


def make_inputs(N, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(N, V, generator=g) * 2).to(dtype=dtype).to(device)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    return logits, labels


def run_case(N, V, dtype, device, impls, reps, with_backward=True, with_memory=True):
    dev = _common.device_info(device)
    logits, labels = make_inputs(N, V, dtype, device)
    item = logits.element_size()
    case = {"N": N, "V": V, "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for name, fn in impls.items():
        fwd = lambda: fn(logits, labels)  # noqa: E731
        with torch.no_grad():
            t = _common.time_fn(fwd, device, reps=reps)
            mem = _common.peak_extra_bytes(fwd, device) if with_memory else None
        rows.append(_common.result_row(name, case, "fwd", t, dev, bytes_moved=N * V * item, peak_extra=mem))
        if with_backward:
            x = logits.detach().clone().requires_grad_(True)
            grad = torch.randn(N, device=device)

            def fwd_bwd():
                x.grad = None
                (fn(x, labels) * grad).sum().backward()

            t = _common.time_fn(fwd_bwd, device, reps=reps)
            mem = _common.peak_extra_bytes(fwd_bwd, device) if with_memory else None
            rows.append(_common.result_row(name, case, "fwd+bwd", t, dev, bytes_moved=3 * N * V * item,
                                           peak_extra=mem))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-save", action="store_true", help="do not write a JSON record")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        cases, reps = [(256, 4096, torch.float32)], 5
    elif device.type == "cuda":
        cases, reps = [(16384, v, torch.bfloat16) for v in (50257, 128256, 151936)], 30
    else:
        cases, reps = [(2048, 32000, torch.float32), (2048, 32000, torch.bfloat16)], 10
    impls = _impls(with_compile=not args.no_compile)
    rows = []
    for N, V, dtype in cases:
        print(f"N={N} V={V} {dtype} ...", flush=True)
        rows += run_case(N, V, dtype, device, impls, reps)
    flat = [{**r, **r["case"]} for r in rows]
    _common.print_table(flat, ["impl", "N", "V", "dtype", "pass", "p50_ms", "gbps", "pct_peak_bandwidth", "peak_extra_mb"])
    for (N, V, dtype) in cases:
        for pass_ in ("fwd", "fwd+bwd"):
            sel = {r["impl"]: r["p50_ms"] for r in flat if r["N"] == N and r["V"] == V
                   and r["dtype"] == str(dtype).replace("torch.", "") and r["pass"] == pass_}
            ours = sel["rlhf_fast"]
            print(f"{N}x{V} {dtype} {pass_}: " + ", ".join(f"{k} {v / ours:.2f}x" for k, v in sel.items()
                                                           if k not in ("rlhf_fast", *FILTERED_IMPLS)))
            ours_f = sel["rlhf_fast_filtered"]
            print(f"{N}x{V} {dtype} {pass_} top_k {TOP_K} / top_p {TOP_P}: torch_filtered "
                  f"{sel['torch_filtered'] / ours_f:.2f}x, unfiltered rlhf_fast {ours / ours_f:.2f}x")
    if not args.no_save:
        print("record:", _common.write_record("logprob", device, {"cases": [list(map(str, c)) for c in cases], "reps": reps}, rows))


# ---- pytest: every path runs once on a small case and agrees with the reference ----------------

@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bench_logprob(benchmark, impl, dtype):
    logits, labels = make_inputs(64, 1000, dtype, torch.device("cpu"))
    out = benchmark(IMPLS[impl], logits, labels)
    expected = ref.gather_logprobs(logits.double(), labels)
    tol = 1e-4 if (impl == "trl_selective" and dtype == torch.bfloat16) else 1e-5
    if impl == "trl_selective" and dtype == torch.bfloat16:
        tol = 0.1  # TRL's bf16 path computes log_softmax in bf16: that is the point of the comparison
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)


@pytest.mark.parametrize("impl", list(FILTERED_IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bench_logprob_filtered(benchmark, impl, dtype):
    logits, labels = make_inputs(64, 1000, dtype, torch.device("cpu"))
    out = benchmark(FILTERED_IMPLS[impl], logits, labels)
    expected = ref.gather_logprobs(logits.double(), labels, top_k=TOP_K, top_p=TOP_P)
    assert torch.isfinite(expected).any() and torch.isinf(expected).any()  # both kinds of labels occur
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_bench_logprob_record(tmp_path):
    impls = {**IMPLS, **FILTERED_IMPLS}
    rows = run_case(32, 300, torch.float32, torch.device("cpu"), impls, reps=2)
    assert {r["impl"] for r in rows} == set(impls) and all(r["gbps"] > 0 for r in rows)
    path = _common.write_record("logprob", torch.device("cpu"), {"test": True}, rows, out_dir=tmp_path)
    assert path.exists()


if __name__ == "__main__":
    main()
