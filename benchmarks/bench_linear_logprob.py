"""Token log-probs from hidden states (lm_head matmul + log-softmax + gather): rlhf_fast vs the
peers' ways.

    python benchmarks/bench_linear_logprob.py            # this device's default sizes, JSON record
    python benchmarks/bench_linear_logprob.py --quick    # small sizes, a smoke run
    python benchmarks/bench_linear_logprob.py --real     # the vocabularies users run (issue 35)
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
  rlhf_fast_filtered    ops.linear_logprobs(top_k=, top_p=): with autograd, a chunked pre-pass finds
                        each row's kept set (one more lm_head GEMM over the rows), then the same
                        chunked kernel path summing kept tokens only; without a graph (the forward
                        rows here), each chunk's cut and log-probs from one GEMM; no [N, V] tensor
  materialise_filtered  logits stored, the engine's filter_logits, log_softmax + gather
Real shapes (``--real``, issue 35: the settings of ``ppo.use_linear_logprobs``): the library's
paths only, ``rlhf_fast`` (true: the fused op) / ``materialise`` (false: stored logits) / ``auto``
(the stored path in checkpointed row chunks of 256 MB of logits) and the first two at top-p 0.9 (top-k off;
``materialise_top_p`` is ``gather_logprobs(h @ w.T, top_p=0.9)``, what the unfused policy runs), at
Qwen2-0.5B's head (H 896, V 151,936) and Llama-3.2-1B's (H 2,048, V 128,256), 256 / 1,024 / 4,096
tokens, float32 and bfloat16 (bf16 only where the CPU has native bf16 matmuls). Each (impl, pass)
runs once after one warm-up at the smallest size, time and memory from the same profiled call
(the profiler adds a few events per chunk: negligible beside 0.1-60 s calls).
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


REAL_TOP_P = 0.9
class _Head(torch.nn.Module):
    """A bias-free head around a given (V, H) weight (a plain tensor: the benchmark owns it)."""

    def __init__(self, weight):
        super().__init__()
        self.weight, self.out_features = weight, weight.shape[0]

    def forward(self, h):
        return torch.nn.functional.linear(h, self.weight)


def auto_chunked(h, w, y):
    """``ppo.use_linear_logprobs: auto`` at the default budget: the stored path, in checkpointed row
    chunks of 256 MB of logits when the call's would exceed that (models/heads.py)."""
    from rlhf_fast.models.heads import DEFAULT_LOGITS_BUDGET_MB, logprobs_from_hidden

    return logprobs_from_hidden(h, _Head(w), y, use_linear_logprobs="auto", logits_budget_mb=DEFAULT_LOGITS_BUDGET_MB)


REAL_IMPLS = {
    "rlhf_fast": lambda h, w, y: ops.linear_logprobs(h, w, y),
    "auto": auto_chunked,
    "materialise": materialise,
    "rlhf_fast_top_p": lambda h, w, y: ops.linear_logprobs(h, w, y, top_p=REAL_TOP_P),
    "materialise_top_p": lambda h, w, y: ops.gather_logprobs(h @ w.T, y, top_p=REAL_TOP_P),
}


def real_cases(tokens=(256, 1024, 4096), llama_tokens=(256, 1024)):
    """(N, H, V, dtype): Qwen2-0.5B's head at every size, Llama-3.2-1B's (twice the work per
    token) at the smaller ones; bfloat16 only with native bf16 matmuls (else ~40x slower, not a
    setting anyone runs)."""
    from rlhf_fast.models.precision import cpu_has_fast_matmul

    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_fast_matmul("bf16") else [])
    return ([(n, 896, 151936, d) for d in dtypes for n in tokens]
            + [(n, 2048, 128256, d) for d in dtypes for n in llama_tokens])


def _timed_peak(fn) -> tuple[dict, int]:
    """One call of ``fn`` under the memory profiler: ({p20,p50,p80}_ms of that call, peak extra bytes)."""
    import time

    box = {}

    def timed():
        t0 = time.perf_counter()
        fn()
        box["ms"] = (time.perf_counter() - t0) * 1e3

    peak = _common.peak_extra_bytes(timed, torch.device("cpu"))
    ms = box["ms"]
    return {"p20_ms": ms, "p50_ms": ms, "p80_ms": ms, "reps": 1}, peak


def run_real_case(N, H, V, dtype, impls, *, warm: bool):
    dev = _common.device_info(torch.device("cpu"))
    hidden, weight, labels = make_inputs(N, H, V, dtype, torch.device("cpu"))
    case = {"N": N, "H": H, "V": V, "dtype": str(dtype).replace("torch.", ""),
            "logits_mb": round(N * V * hidden.element_size() / 2**20, 1)}
    flops = 2.0 * N * V * H
    rows = []
    for name, fn in impls.items():
        with torch.no_grad():
            if warm:
                fn(hidden, weight, labels)
            t, mem = _timed_peak(lambda: fn(hidden, weight, labels))
        rows.append(_common.result_row(name, case, "fwd", t, dev, flops=flops, peak_extra=mem))
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(True)
        grad = torch.randn(N)

        def fwd_bwd():
            (fn(h, w, labels) * grad).sum().backward()

        t, mem = _timed_peak(fwd_bwd)
        del h, w
        rows.append(_common.result_row(name, case, "fwd+bwd", t, dev, flops=3 * flops, peak_extra=mem))
        print(f"  {name}: fwd {rows[-2]['p50_ms']:.0f} ms {rows[-2]['peak_extra_mb']:.0f} MB, "
              f"fwd+bwd {rows[-1]['p50_ms']:.0f} ms {rows[-1]['peak_extra_mb']:.0f} MB", flush=True)
    return rows


def main_real(args) -> None:
    torch.set_num_threads(args.threads)
    cases = real_cases()
    if args.max_tokens:
        cases = [c for c in cases if c[0] <= args.max_tokens]
    if args.dtype:
        cases = [c for c in cases if c[3] == getattr(torch, args.dtype)]
    rows, loads, path = [], [], None
    for i, (N, H, V, dtype) in enumerate(cases):
        loads.append(_load())
        print(f"N={N} H={H} V={V} {dtype} (load average {loads[-1]:.2f}) ...", flush=True)
        rows += run_real_case(N, H, V, dtype, REAL_IMPLS, warm=(i == 0 or N == min(c[0] for c in cases)))
        if not args.no_save:  # after every case: a long grid cut short still leaves its record
            config = {"mode": "real", "cases": [[n, h, v, str(d)] for n, h, v, d in cases[: i + 1]], "reps": 1,
                      "top_p": REAL_TOP_P, "torch_threads": torch.get_num_threads(),
                      "load_average_1min_before_each_case": loads, "cpu_chunk_bytes": _lin().CPU_CHUNK_BYTES,
                      "cpu_min_rows": _lin().CPU_MIN_ROWS}
            if path is not None:
                path.unlink()
            path = _common.write_record("linear_logprob_real", torch.device("cpu"), config, rows)
    flat = [{**r, **r["case"]} for r in rows]
    _common.print_table(flat, ["impl", "N", "H", "V", "dtype", "logits_mb", "pass", "p50_ms", "tflops",
                               "peak_extra_mb"])
    print("record:", path)


def _lin():
    return sys.modules["rlhf_fast.ops.linear_logprobs"]  # the package attribute is the function


def _load() -> float:
    import os

    return os.getloadavg()[0]


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
    p.add_argument("--real", action="store_true", help="the real-shape grid (CPU, one call per case)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for --real")
    p.add_argument("--max-tokens", type=int, default=None, help="--real: skip cases above this many tokens")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="--real: this dtype only")
    args = p.parse_args(argv)
    if args.real:
        return main_real(args)
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


def test_bench_real_case_runs():
    """The --real path on a small case: every impl, both passes, a peak and a time each."""
    rows = run_real_case(24, 16, 300, torch.float32, REAL_IMPLS, warm=True)
    assert {(r["impl"], r["pass"]) for r in rows} == {(i, p) for i in REAL_IMPLS for p in ("fwd", "fwd+bwd")}
    assert all(r["p50_ms"] > 0 and r["peak_extra_mb"] >= 0 for r in rows)
    assert {c[1:3] for c in real_cases()} == {(896, 151936), (2048, 128256)}


def test_bench_linear_logprob_record(tmp_path):
    impls = {**IMPLS, **FILTERED_IMPLS}
    rows = run_case(32, 16, 300, torch.float32, torch.device("cpu"), impls, reps=2, warmup=1)
    assert {r["impl"] for r in rows} == set(impls) and all(r["tflops"] > 0 for r in rows)
    path = _common.write_record("linear_logprob", torch.device("cpu"), {"test": True}, rows, out_dir=tmp_path)
    assert path.exists()


if __name__ == "__main__":
    main()
