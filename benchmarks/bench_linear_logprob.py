"""Token log-probs from hidden states (lm_head matmul + log-softmax + gather): rlhf_fast vs the
peers' ways.

    python benchmarks/bench_linear_logprob.py            # this device's default sizes, JSON record
    python benchmarks/bench_linear_logprob.py --quick    # small sizes, a smoke run
    pytest benchmarks/bench_linear_logprob.py --benchmark-disable   # CI: every path runs once, checked

Implementations (temperature 1, float32 log-probs, differentiable w.r.t. hidden and weight):
  rlhf_fast        ops.linear_logprobs: logits never stored whole (CPU: row chunks of
                   CPU_CHUNK_BYTES; GPU: Triton tiles on chip)
  materialise      logits = hidden @ weight.T, then ops.gather_logprobs (the fused log-prob op on
                   a stored [N, V])
  trl              TRL-style: logits, then selective_log_softmax (fp32: gather - per-row
                   logsumexp loop; bf16: per-row log_softmax + gather loop)
  chunked_torch    verl-fallback / Liger style: an autograd.Function over row chunks, plain
                   log_softmax + gather per chunk, the backward recomputes each chunk under autograd
  compile          torch.compile of materialise + log_softmax(float) + gather (DeepSpeed-Chat style)
Filtered (the engine's sampling filter, top_k 50 / top_p 0.9, issue 18):
  rlhf_fast_filtered    ops.linear_logprobs(top_k=, top_p=): a chunked pre-pass finds each row's
                        kept set (one more lm_head GEMM over the rows), then the same chunked
                        kernel path summing kept tokens only; still no [N, V] tensor
  materialise_filtered  logits stored, the engine's filter_logits, log_softmax + gather
FLOPs: forward 2*N*V*H, forward+backward 6*N*V*H (the useful matmuls; recomputation not counted),
so TFLOP/s is comparable across implementations. Peak memory: ``_common.peak_extra_bytes`` —
on CUDA the caching allocator's peak; on CPU the running total of torch's CPU allocator as seen
by the profiler (``profile_memory=True``), beyond what existed before the call; small malloc'd
scratch inside C++ kernels (O(V) per thread) is not counted. The forward is measured under
``no_grad`` (how the reference and old-policy passes run); forward+backward includes the
gradients themselves (d(hidden) and d(weight)), the same for every implementation.
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


def materialise(h, w, y):
    return ops.gather_logprobs(h @ w.T, y)


def trl(h, w, y):
    logits = h @ w.T
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # rows one at a time
        return picked - lse
    out = [torch.log_softmax(row.float(), -1).gather(-1, lab.unsqueeze(-1)).squeeze(-1) for row, lab in zip(logits, y)]
    return torch.stack(out)


def _chunk_logprobs(h, w, y):
    return torch.log_softmax((h @ w.T).float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


class _ChunkedTorch(torch.autograd.Function):
    """verl's torch fallback for fused linear log-probs, in spirit: forward chunk by chunk without
    keeping logits, backward recomputes each chunk under autograd and accumulates d(weight)."""

    @staticmethod
    def forward(ctx, h, w, y, rows):
        ctx.save_for_backward(h, w, y)
        ctx.rows = rows
        return torch.cat([_chunk_logprobs(h[i : i + rows], w, y[i : i + rows]) for i in range(0, h.shape[0], rows)])

    @staticmethod
    def backward(ctx, g):
        h, w, y = ctx.saved_tensors
        dh = torch.empty_like(h)
        dw = torch.zeros_like(w, dtype=torch.float32)
        for i in range(0, h.shape[0], ctx.rows):
            with torch.enable_grad():
                hc = h[i : i + ctx.rows].detach().requires_grad_()
                wc = w.detach().requires_grad_()
                lp = _chunk_logprobs(hc, wc, y[i : i + ctx.rows])
                gh, gw = torch.autograd.grad(lp, (hc, wc), g[i : i + ctx.rows])
            dh[i : i + ctx.rows] = gh
            dw += gw
        return dh, dw.to(w.dtype), None, None


def chunked_torch(h, w, y, chunk_bytes=32 << 20):
    rows = max(1, chunk_bytes // (4 * w.shape[0]))  # the same chunk budget as rlhf_fast's CPU path
    return _ChunkedTorch.apply(h, w, y, rows)


def dschat(h, w, y):
    return torch.log_softmax((h @ w.T).float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


IMPLS = {
    "rlhf_fast": lambda h, w, y: ops.linear_logprobs(h, w, y),
    "materialise": materialise,
    "trl": trl,
    "chunked_torch": chunked_torch,
}


TOP_K, TOP_P = 50, 0.9


def materialise_filtered(h, w, y):
    z = _filter.filter_logits((h @ w.T).float(), TOP_K, TOP_P)
    return torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


FILTERED_IMPLS = {
    "rlhf_fast_filtered": lambda h, w, y: ops.linear_logprobs(h, w, y, top_k=TOP_K, top_p=TOP_P),
    "materialise_filtered": materialise_filtered,
}


def _impls(with_compile: bool):
    impls = {**IMPLS, **FILTERED_IMPLS}
    if with_compile:
        impls["compile"] = torch.compile(dschat, dynamic=False)
    return impls


def make_inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype=dtype, device=device)
    weight = (torch.randn(V, H, generator=g) / H**0.5 * 2).to(dtype=dtype, device=device)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    return hidden, weight, labels


def run_case(N, H, V, dtype, device, impls, reps, *, warmup=2, with_backward=True, with_memory=True):
    dev = _common.device_info(device)
    hidden, weight, labels = make_inputs(N, H, V, dtype, device)
    case = {"N": N, "H": H, "V": V, "dtype": str(dtype).replace("torch.", "")}
    flops = 2.0 * N * V * H
    rows = []
    for name, fn in impls.items():
        fwd = lambda: fn(hidden, weight, labels)  # noqa: E731
        with torch.no_grad():
            t = _common.time_fn(fwd, device, reps=reps, warmup=warmup)
            mem = _common.peak_extra_bytes(fwd, device) if with_memory else None
        rows.append(_common.result_row(name, case, "fwd", t, dev, flops=flops, peak_extra=mem))
        if with_backward:
            h = hidden.detach().clone().requires_grad_(True)
            w = weight.detach().clone().requires_grad_(True)
            grad = torch.randn(N, device=device)

            def fwd_bwd():
                h.grad = w.grad = None
                (fn(h, w, labels) * grad).sum().backward()

            t = _common.time_fn(fwd_bwd, device, reps=reps, warmup=warmup)
            h.grad = w.grad = None
            mem = _common.peak_extra_bytes(fwd_bwd, device) if with_memory else None
            h.grad = w.grad = None
            rows.append(_common.result_row(name, case, "fwd+bwd", t, dev, flops=3 * flops, peak_extra=mem))
        print(f"  {name} done", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-save", action="store_true", help="do not write a JSON record")
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        cases, reps = [(512, 128, 4096, torch.float32)], 5
    elif device.type == "cuda":
        cases, reps = [(16384, 4096, 128256, torch.bfloat16)], 10
    else:
        # The CPU target: peak extra memory <= 1/4 of materialise's at <= 1.5x its time.
        cases, reps = [(4096, 256, 32000, torch.float32)], 5
    reps = args.reps or reps
    impls = _impls(with_compile=not args.no_compile)
    rows = []
    for N, H, V, dtype in cases:
        print(f"N={N} H={H} V={V} {dtype} ...", flush=True)
        rows += run_case(N, H, V, dtype, device, impls, reps)
    flat = [{**r, **r["case"]} for r in rows]
    _common.print_table(flat, ["impl", "N", "H", "V", "dtype", "pass", "p20_ms", "p50_ms", "p80_ms", "tflops",
                               "peak_extra_mb"])
    for N, H, V, dtype in cases:
        for pass_ in ("fwd", "fwd+bwd"):
            sel = {r["impl"]: r for r in flat if (r["N"], r["H"], r["V"]) == (N, H, V) and r["pass"] == pass_}
            for ours_name, base_name in (("rlhf_fast", "materialise"), ("rlhf_fast_filtered", "materialise_filtered")):
                ours, base = sel[ours_name], sel[base_name]
                print(f"{N}x{H}x{V} {pass_} {ours_name}: time {ours['p50_ms'] / base['p50_ms']:.2f}x {base_name}, "
                      f"peak extra memory {ours['peak_extra_mb'] / max(base['peak_extra_mb'], 1e-9):.3f}x {base_name}; "
                      + ", ".join(f"{k} {v['p50_ms'] / ours['p50_ms']:.2f}x our time" for k, v in sel.items()
                                  if k != ours_name))
    if not args.no_save:
        config = {"cases": [[N, H, V, str(d)] for N, H, V, d in cases], "reps": reps, "temperature": 1.0,
                  "flops": "fwd 2NVH, fwd+bwd 6NVH", "torch_threads": torch.get_num_threads()}
        print("record:", _common.write_record("linear_logprob", device, config, rows))


# ---- pytest: every path runs once on a small case and agrees with the reference ----------------

@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bench_linear_logprob(benchmark, impl, dtype):
    hidden, weight, labels = make_inputs(48, 32, 1000, dtype, torch.device("cpu"))
    out = benchmark(IMPLS[impl], hidden, weight, labels)
    expected = ref.linear_logprobs(hidden.double(), weight.double(), labels)
    # bf16: the peers' matmul rounds the logits to bf16 (that is the point of the comparison)
    tol = 1e-4 if dtype == torch.float32 else (1e-4 if impl == "rlhf_fast" else 0.2)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=tol)


@pytest.mark.parametrize("impl", ["rlhf_fast", "chunked_torch"])
def test_bench_gradients_agree(impl):
    hidden, weight, labels = make_inputs(40, 16, 300, torch.float32, torch.device("cpu"))
    g = torch.randn(40, dtype=torch.float64)
    grads = []
    for fn, dt in ((IMPLS[impl], torch.float32), (ref.linear_logprobs, torch.float64)):
        h = hidden.detach().to(dt).requires_grad_()
        w = weight.detach().to(dt).requires_grad_()
        kw = {"chunk_bytes": 4 * 300 * 7} if (fn is chunked_torch) else {}
        (fn(h, w, labels, **kw).double() * g).sum().backward()
        grads.append((h.grad.double(), w.grad.double()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", list(FILTERED_IMPLS))
def test_bench_linear_logprob_filtered(benchmark, impl):
    hidden, weight, labels = make_inputs(48, 32, 1000, torch.float32, torch.device("cpu"))
    out = benchmark(FILTERED_IMPLS[impl], hidden, weight, labels)
    # the float64 reference decides the kept set on its own (float64-matmul) logits: no row of this
    # seed has a token within rounding of the top-k / top-p cut, so the sets are the same
    expected = ref.linear_logprobs(hidden.double(), weight.double(), labels, top_k=TOP_K, top_p=TOP_P)
    assert torch.isfinite(expected).any() and torch.isinf(expected).any()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)


def test_bench_linear_logprob_record(tmp_path):
    impls = {**IMPLS, **FILTERED_IMPLS}
    rows = run_case(32, 16, 300, torch.float32, torch.device("cpu"), impls, reps=2, warmup=1)
    assert {r["impl"] for r in rows} == set(impls) and all(r["tflops"] > 0 for r in rows)
    path = _common.write_record("linear_logprob", torch.device("cpu"), {"test": True}, rows, out_dir=tmp_path)
    assert path.exists()


if __name__ == "__main__":
    main()
