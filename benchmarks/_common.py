"""Shared benchmark harness: timing, memory, device facts, and the JSON record format.

Every benchmark reports physics, not just milliseconds (docs/architecture.md, "Benchmarks"): GB/s and percent of the
device's memory bandwidth for memory-bound ops, TFLOP/s and percent of peak for matmul-bound
ones. Compile and warm-up are excluded; on a GPU the L2 cache is flushed before every timed call.

Record (one JSON file per run under benchmarks/results/):
    {"benchmark", "date", "device": {"name", "kind", "peak_bandwidth_gbps", "peak_bandwidth_source",
     "peak_tflops_bf16"}, "versions": {...}, "config": {...}, "results": [{"impl", "case", "pass",
     "p20_ms", "p50_ms", "p80_ms", "gbps", "pct_peak_bandwidth", "tflops", "pct_peak_tflops",
     "peak_extra_mb", ...}]}
"""

from __future__ import annotations

import contextlib

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Datasheet peaks (dense bf16 tensor-core TFLOP/s; HBM bandwidth).
_GPU_PEAKS = {
    "H200": (4800.0, 989.0),
    "H100 80GB HBM3": (3350.0, 989.0),  # SXM
    "H100 PCIe": (2000.0, 756.0),
    "H100": (3350.0, 989.0),
    "A100": (2039.0, 312.0),
}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "transformers", "deepspeed"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


_CPU_BW: float | None = None


def measured_cpu_bandwidth_gbps() -> float:
    """Copy bandwidth of this CPU (read + write bytes / time of a 256 MiB clone, best of 5)."""
    global _CPU_BW
    if _CPU_BW is None:
        x = torch.empty(64 * 1024 * 1024, dtype=torch.float32).fill_(1.0)
        y = torch.empty_like(x)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            y.copy_(x)
            best = min(best, time.perf_counter() - t0)
        _CPU_BW = 2 * x.numel() * 4 / best / 1e9
    return _CPU_BW


def cpu_allocator() -> str:
    """The malloc policy in effect, for the record: rlhf_fast's own (``rlhf_fast/_malloc.py``, applied
    when rlhf_fast is imported, as for every user), or what the user set instead.

    Benchmarks run with exactly what a user of the CLI, the trainers or the ops gets; they used to
    set a mallopt of their own that users never had (issue 35). ``bench_malloc.py`` compares the
    policy with glibc's defaults in a process that has done other work first."""
    from rlhf_fast._malloc import MALLOC_POLICY

    return MALLOC_POLICY


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bw, tf = next(((b, t) for k, (b, t) in _GPU_PEAKS.items() if k in name), (None, None))
        return {"name": name, "kind": "cuda", "peak_bandwidth_gbps": bw, "peak_bandwidth_source": "datasheet",
                "peak_tflops_bf16": tf, "capability": list(torch.cuda.get_device_capability(device))}
    facts = cpu_facts()
    return {"name": f"{facts['model']} [{facts['isa']}] ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)",
            "kind": "cpu", "peak_bandwidth_gbps": round(measured_cpu_bandwidth_gbps(), 1),
            "peak_bandwidth_source": "measured copy bandwidth", "peak_tflops_bf16": None, "allocator": cpu_allocator(),
            "cpu": facts}


# The CPU flags that decide which kernels run (x86: vector width, FMA, bf16 / AMX matmuls; aarch64:
# NEON = asimd, SVE).
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_bf16", "asimd", "sve", "sve2", "bf16")


def cpu_facts() -> dict:
    """What a CPU record must name (issue 23): the CPU model, its ISA flags that matter, the ISA
    torch dispatches its kernels to (``ATEN_CPU_CAPABILITY`` lowers it) and the ISA build of
    rlhf_fast's C++ kernels in this process."""
    from rlhf_fast.ops import _library

    model, flags, ident = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                key, _, val = ln.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.processor(), platform.machine()):
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
                elif key in ("vendor_id", "cpu family", "model", "CPU implementer", "CPU part") and key not in ident:
                    ident[key] = val.strip()  # "AMD EPYC" alone hides the generation: family 26 is Zen 5
    except OSError:
        pass
    _library.load_extension()
    return {"model": model, "id": ident, "machine": platform.machine(), "isa": _library.torch_cpu_capability(),
            "kernels_isa": _library.loaded_isa(), "flags": [f for f in _ISA_FLAGS if f in flags],
            "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY")}


def time_fn(fn: Callable[[], object], device: torch.device, *, reps: int = 20, warmup: int = 3,
            flush_l2: bool = True) -> dict:
    """p20 / p50 / p80 of `reps` timed calls after `warmup` calls, in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device) if flush_l2 else None
        torch.cuda.synchronize(device)
        for _ in range(reps):
            if flush is not None:
                flush.zero_()  # evict L2 (50 MB on H100/H200) so small kernels are not flattered
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)  # CPU-GPU sync point: per-rep timing
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else times * 9
    return {"p20_ms": q[1], "p50_ms": statistics.median(times), "p80_ms": q[7], "reps": len(times)}


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated by one call of `fn` beyond what existed before it.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocation events."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return _cpu_peak_extra_bytes(fn)


def _cpu_peak_extra_bytes(fn: Callable[[], object]) -> int:
    # The profiler's memory events carry the running total of bytes allocated through torch's
    # CPU allocator since profiling started; its maximum is the peak extra. (Forking a child and
    # reading ru_maxrss hangs: libgomp's thread pool does not survive fork.) Memory that C++ code
    # takes with malloc / std::vector is not seen: the rlhf_fast kernels take O(V) per thread.
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: e["ts"])
    # Running sum of the allocation (+) and free (-) events: the peak above the starting point.
    # ("Total Allocated" is not used: blocks from before profiling start made it drift.)
    peak = run = 0
    for e in mem:
        run += int(e["args"]["Bytes"])
        peak = max(peak, run)
    return peak


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def result_row(impl: str, case: dict, pass_: str, timing: dict, dev: dict, *, bytes_moved: float | None = None,
               flops: float | None = None, peak_extra: int | None = None, **extra) -> dict:
    row = {"impl": impl, "case": case, "pass": pass_, **{k: _sig(v) for k, v in timing.items() if k != "reps"}}
    sec = timing["p50_ms"] / 1e3
    if bytes_moved is not None:
        row["gbps"] = _sig(bytes_moved / sec / 1e9)
        if dev.get("peak_bandwidth_gbps"):
            row["pct_peak_bandwidth"] = _sig(100 * row["gbps"] / dev["peak_bandwidth_gbps"], 3)
    if flops is not None:
        row["tflops"] = _sig(flops / sec / 1e12)
        if dev.get("peak_tflops_bf16"):
            row["pct_peak_tflops"] = _sig(100 * row["tflops"] / dev["peak_tflops_bf16"], 3)
    if peak_extra is not None:
        row["peak_extra_mb"] = round(peak_extra / 2**20, 2)
    row.update(extra)
    return row


def make_record(benchmark: str, device: torch.device, config: dict, results: list[dict]) -> dict:
    now = _dt.datetime.now(_dt.timezone.utc)
    return {"benchmark": benchmark, "date": now.isoformat(timespec="seconds"), "device": device_info(device),
            "versions": versions(), "config": config, "results": results}


def write_record(benchmark: str, device: torch.device, config: dict, results: list[dict],
                 out_dir: Path = RESULTS_DIR) -> Path:
    record = make_record(benchmark, device, config, results)
    dev = record["device"]
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "".join(c if c.isalnum() else "-" for c in dev["name"].split("(")[0].strip())
    tag = "-".join(part for part in tag.split("-") if part)[:48]  # e.g. AMD-EPYC-AVX512: one file set per ISA
    stamp = _dt.datetime.fromisoformat(record["date"]).strftime("%Y%m%dT%H%M%S")
    path = out_dir / f"{benchmark}_{dev['kind']}_{tag}_{stamp}.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def print_table(rows: list[dict], keys: list[str]) -> None:
    widths = [max([len(k)] + [len(str(r.get(k, ""))) for r in rows]) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r.get(k, "")).ljust(w) for k, w in zip(keys, widths)))


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
