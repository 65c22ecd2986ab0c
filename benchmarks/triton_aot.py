"""Ahead-of-time compile check: every Triton kernel, compiled for real NVIDIA targets, no GPU needed.

    python benchmarks/triton_aot.py                    # all configs for sm_90 and sm_80; JSON record
    python benchmarks/triton_aot.py --arch 90 --quick  # a representative subset (what the test runs)
    python benchmarks/triton_aot.py --json out.json --no-save

Why. On a CPU-only machine the kernels only ever run under ``TRITON_INTERPRET=1``, a numpy
emulation that skips the real compiler: wrong dtypes in a loop-carried value, a libdevice call
on an unsupported type, a tile that does not fit in shared memory or a block size that spills
registers all pass there and fail (or crawl) on the first GPU. Here each kernel goes through the
whole NVIDIA pipeline (``triton.compile``: TTIR -> TTGIR -> LLVM IR -> PTX -> ``ptxas`` -> cubin;
the ptxas binaries ship in the triton wheel) for the configurations its launcher would pick.

What a configuration is. The launchers in kernels/*.py are asked for their GPU choices directly
(``_launch_config(..., torch.device("cuda"))`` needs no CUDA: it only reads ``device.type``),
and each kernel argument is specialised the way ``JITFunction.run`` specialises it at launch
(``native_specialize_impl``: pointer dtype and 16-byte alignment, ints divisible by 16 or equal
to 1, floats as fp32), from example arguments built like the launcher's call at realistic sizes:
N = 16 x 1024 tokens, V in VOCABS, H = 4096 for the fused lm_head, [B, T] = [512, 1024] for the
RL math.

Reported per kernel, config and arch: registers per thread and spill bytes (``ptxas -v``, the log
triton asks for and drops unless ``TRITON_DUMP_PTXAS_LOG``), the static + dynamic shared memory
the launch requests (``metadata.shared``; checked against the architecture's per-block limit,
which triton itself checks only when a GPU loads the cubin) and compile seconds (the cache is
bypassed). ``n_spills`` counts 32-bit words of spill stores; the runtime's ``n_spills`` is the
local-memory size / 4, the same number when the stack frame holds only spills.

The kernels must be imported with TRITON_INTERPRET unset (under the interpreter ``triton.jit``
returns interpreter objects), so the variable is dropped before anything imports triton; tests,
whose conftest sets it, run this file in a subprocess.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: see the docstring

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend, get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from rlhf_fast.kernels import linear_logprobs as lin  # noqa: E402
from rlhf_fast.kernels import logprobs as lpk  # noqa: E402
from rlhf_fast.kernels import rlmath as rlm  # noqa: E402

CUDA = torch.device("cuda")  # a device *name*: the launchers' config helpers only read .type
VOCABS = (32000, 50257, 128256, 151936)  # Llama-2, GPT-2, Llama-3, Qwen-2
B_TOK, T_TOK = 16, 1024  # 16k tokens per log-prob call (the GPU target in benchmarks/TARGETS.md)
HIDDEN = 4096
RL_B, RL_T = 512, 1024
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Max shared memory one block may request (opt-in), bytes: CUDA C Programming Guide, "Technical
# Specifications per Compute Capability" (sm_80: 163 KB, sm_86/89: 99 KB, sm_90: 227 KB).
MAX_SHARED = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# SM counts the vocabulary split is sized for (H100 SXM, A100): only the divisibility of the
# resulting tiles_per_split reaches the compiler.
SMS = {80: 108, 86: 84, 89: 128, 90: 132}


@dataclass
class KernelConfig:
    """One launch as a launcher would make it: the kernel, example arguments, launch options."""

    kernel: str
    """Short name, for the table."""
    fn: triton.runtime.JITFunction
    case: dict
    """What the config stands for (dtype, sizes, flags), for the table."""
    args: dict
    """Every kernel parameter by name: an example tensor (its dtype and alignment count), a Python
    int / float / bool as the launcher passes it, or the constexpr value."""
    options: dict = field(default_factory=dict)
    """num_warps / num_stages as the launcher passes them (triton's defaults otherwise: 4 / 3)."""
    quick: bool = False
    """Part of the representative subset (--quick, the test)."""

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.case.items())


def _t(dtype: torch.dtype) -> torch.Tensor:
    # Stands in for a device tensor: only the dtype and the 16-byte alignment of data_ptr() are
    # read, and CPU allocations are aligned like CUDA's caching allocator (>= 64 bytes).
    return torch.empty(1, dtype=dtype)


_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# ---- configurations, one builder per kernel file ----------------------------------------------

def logprobs_configs() -> list[KernelConfig]:
    """gather_logprobs_{fwd,bwd}: logits (B, T+1, V) sliced to [:, :-1] (read in place, so
    stride_b = (T+1) V), every dtype, both flags."""
    out = []
    for V, dtype in itertools.product(VOCABS, DTYPES):
        block, num_warps = lpk._launch_config(V, CUDA)
        common = dict(T=T_TOK, stride_b=(T_TOK + 1) * V, stride_t=V, V=V, ignore_index=-100, BLOCK_V=block)
        # the sampling filter (HAS_CUT) with both flags on or both off, as the trainer calls it
        flags = [(a, b, False) for a, b in itertools.product((False, True), repeat=2)] + [
            (False, False, True), (True, True, True)]
        for flag_a, flag_b, cut in flags:
            quick = V in (32000, 50257) and flag_a == flag_b and dtype != torch.float16
            case = dict(dtype=_NAMES[dtype], V=V, BLOCK_V=block, warps=num_warps)
            cut_args = dict(cut_value_ptr=_t(torch.float32), cut_index_ptr=_t(torch.int64),
                            inv_temperature=1 / 0.7 if flag_a else 1.0, HAS_CUT=cut, CUT_BY_RECIPROCAL=cut)
            out.append(KernelConfig("logprobs_fwd", lpk._logprobs_fwd_kernel,
                                    {**case, "temp": flag_a, "entropy": flag_b, "cut": cut},
                                    dict(logits_ptr=_t(dtype), labels_ptr=_t(torch.int64),
                                         logprobs_ptr=_t(torch.float32), entropy_ptr=_t(torch.float32),
                                         stats_ptr=_t(torch.float32),
                                         temperature=0.7 if flag_a else 1.0, **common, **cut_args,
                                         HAS_TEMPERATURE=flag_a, RETURN_ENTROPY=flag_b),
                                    dict(num_warps=num_warps), quick))
            out.append(KernelConfig("logprobs_bwd", lpk._logprobs_bwd_kernel,
                                    {**case, "temp": flag_a, "grad_entropy": flag_b, "cut": cut},
                                    dict(dlogits_ptr=_t(dtype), logits_ptr=_t(dtype), labels_ptr=_t(torch.int64),
                                         grad_logprobs_ptr=_t(torch.float32), grad_entropy_ptr=_t(torch.float32),
                                         stats_ptr=_t(torch.float32), entropy_ptr=_t(torch.float32),
                                         temperature=0.7 if flag_a else 1.0, **common, **cut_args,
                                         HAS_TEMPERATURE=flag_a, HAS_GRAD_ENTROPY=flag_b),
                                    dict(num_warps=num_warps), quick))
    return out


def linear_logprobs_configs(arch: int) -> list[KernelConfig]:
    """linear_logprobs_{fwd,bwd}: hidden (N, H), weight (V, H) contiguous, N = 16k, H = 4096."""
    N, H = B_TOK * T_TOK, HIDDEN
    out = []
    for V, dtype in itertools.product(VOCABS, DTYPES):
        cfg = lin._launch_config(N, V, H, dtype, CUDA)
        options = {k: cfg.pop(k) for k in ("num_warps", "num_stages") if k in cfg}
        # _num_splits(N, V, cfg, device) without a device: ~2 programs per SM.
        n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
        want = max(1, triton.cdiv(2 * SMS.get(arch, 132), triton.cdiv(N, cfg["BLOCK_N"])))
        per = triton.cdiv(n_tiles, min(want, n_tiles))
        common = dict(hidden_ptr=_t(dtype), weight_ptr=_t(dtype), labels_ptr=_t(torch.int64), N=N, V=V, H=H,
                      stride_hn=H, stride_wv=H, **cfg)
        tiles = f"{cfg['BLOCK_N']}x{cfg['BLOCK_V']}x{cfg['BLOCK_H']}"
        case = dict(dtype=_NAMES[dtype], V=V, tile=tiles, warps=options.get("num_warps", 4),
                    stages=options.get("num_stages", 3))
        for flag_a, flag_b in itertools.product((False, True), repeat=2):
            quick = V == 128256 and flag_a == flag_b and dtype != torch.float16
            f32 = {name: _t(torch.float32) for name in ("m_ptr", "s_ptr", "t_ptr", "zy_ptr")}
            out.append(KernelConfig("linear_logprobs_fwd", lin._linear_logprobs_fwd_kernel,
                                    {**case, "temp": flag_a, "entropy": flag_b},
                                    dict(common, **f32, tiles_per_split=per, temperature=0.7 if flag_a else 1.0,
                                         HAS_TEMPERATURE=flag_a, RETURN_ENTROPY=flag_b),
                                    options, quick))
            f32 = {name: _t(torch.float32) for name in ("grad_logprobs_ptr", "grad_entropy_ptr", "stats_ptr",
                                                         "entropy_ptr", "dhidden_ptr", "dweight_ptr")}
            out.append(KernelConfig("linear_logprobs_bwd", lin._linear_logprobs_bwd_kernel,
                                    {**case, "temp": flag_a, "grad_entropy": flag_b},
                                    dict(common, **f32, temperature=0.7 if flag_a else 1.0, ignore_index=-100,
                                         HAS_TEMPERATURE=flag_a, HAS_GRAD_ENTROPY=flag_b),
                                    options, quick))
    return out


def rlmath_configs() -> list[KernelConfig]:
    """The RL math at [B, T] = [512, 1024]: float32 (what the trainer passes) and bfloat16 inputs
    (the launchers accept any floating dtype); bool masks as uint8."""
    B, T = RL_B, RL_T
    n = B * T
    f32, u8 = torch.float32, torch.uint8
    block_t = rlm._row_block(T, CUDA)
    flat = rlm._FLAT_BLOCK
    moments_block = min(triton.next_power_of_2(n), 4096)  # masked_moments_fwd
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        dt = _NAMES[dtype]
        for est, has_clamp in itertools.product(rlm.ESTIMATOR_CODES, (False, True)):
            quick = dtype == torch.float32 and has_clamp == (est == "k3")
            out.append(KernelConfig("kl_penalty", rlm._kl_penalty_kernel,
                                    dict(dtype=dt, n=n, BLOCK=flat, est=est, clamp=has_clamp),
                                    dict(lp_ptr=_t(dtype), ref_ptr=_t(dtype), out_ptr=_t(f32), N=n,
                                         clamp=10.0 if has_clamp else 0.0, BLOCK=flat,
                                         ESTIMATOR=rlm.ESTIMATOR_CODES[est], HAS_CLAMP=has_clamp), quick=quick))
            out.append(KernelConfig("shape_rewards", rlm._shape_rewards_kernel,
                                    dict(dtype=dt, B=B, T=T, BLOCK_T=block_t, est=est, clamp=has_clamp),
                                    dict(scores_ptr=_t(f32), lp_ptr=_t(dtype), ref_ptr=_t(dtype), mask_ptr=_t(u8),
                                         rewards_ptr=_t(f32), kl_ptr=_t(f32), T=T, kl_coef=0.05,
                                         clamp=10.0 if has_clamp else 0.0, BLOCK_T=block_t,
                                         ESTIMATOR=rlm.ESTIMATOR_CODES[est], HAS_CLAMP=has_clamp), quick=quick))
        out.append(KernelConfig("gae", rlm._gae_kernel, dict(dtype=dt, B=B, T=T, BLOCK_T=block_t),
                                dict(rewards_ptr=_t(dtype), values_ptr=_t(dtype), mask_ptr=_t(u8), adv_ptr=_t(f32),
                                     ret_ptr=_t(f32), T=T, gamma=1.0, gamma_lam=0.95, BLOCK_T=block_t),
                                quick=dtype == torch.float32))
        out.append(KernelConfig("moments_partial", rlm._moments_partial_kernel,
                                dict(dtype=dt, n=n, BLOCK=moments_block),
                                dict(x_ptr=_t(dtype), mask_ptr=_t(u8), part_ptr=_t(f32), N=n, BLOCK=moments_block),
                                quick=dtype == torch.float32))
        for shift_mean, unbiased in itertools.product((False, True), repeat=2):
            out.append(KernelConfig("whiten_apply", rlm._whiten_apply_kernel,
                                    dict(dtype=dt, n=n, BLOCK=flat, shift_mean=shift_mean, unbiased=unbiased),
                                    dict(x_ptr=_t(dtype), mask_ptr=_t(u8), stats_ptr=_t(torch.float64),
                                         out_ptr=_t(f32), N=n, eps=1e-8, BLOCK=flat, SHIFT_MEAN=shift_mean,
                                         UNBIASED=unbiased),
                                    quick=dtype == torch.float32 and shift_mean and unbiased))
    return out


def all_configs(arch: int) -> list[KernelConfig]:
    return logprobs_configs() + linear_logprobs_configs(arch) + rlmath_configs()


# ---- compiling --------------------------------------------------------------------------------

def specialize(cfg: KernelConfig):
    """(signature, constexprs, attrs) for ASTSource, as JITFunction.run derives them at launch
    (triton/runtime/jit.py: create_function_from_signature and JITFunction._pack_args)."""
    fn = cfg.fn
    if not isinstance(fn, triton.runtime.JITFunction):
        raise TypeError(f"{cfg.kernel} is a {type(fn).__name__}: the kernels were imported under TRITON_INTERPRET=1; "
                        "run this file in a process without it")
    missing = set(fn.arg_names) ^ set(cfg.args)
    if missing:
        raise TypeError(f"{cfg.kernel}: arguments do not match the kernel's parameters: {sorted(missing)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, kp in enumerate(fn.params):
        arg = cfg.args[kp.name]
        if kp.is_constexpr:
            ty, attr = "constexpr", None
        else:
            ty, attr = native_specialize_impl(CUDABackend, arg, kp.is_const, not kp.do_not_specialize,
                                              not kp.do_not_specialize_on_alignment)
        signature[kp.name] = ty
        if ty == "constexpr":  # tl.constexpr parameters, and ints equal to 1
            constexprs[(i,)] = arg
        elif isinstance(attr, str):
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    return signature, constexprs, attrs


_PTXAS_RE = {
    "n_regs": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
}


def compile_one(cfg: KernelConfig, arch: int) -> dict:
    """Compile cfg for sm_<arch>; a result row (status "ok" or "error" with the compiler's message)."""
    row = {"kernel": cfg.kernel, "fn": cfg.fn.__name__, "case": cfg.case, "arch": f"sm_{arch}", "status": "error"}
    # Compile even on a cache hit (so ptxas runs, its -v log exists and compile_s is a compile),
    # and have triton print that log, which it otherwise deletes.
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        signature, constexprs, attrs = specialize(cfg)
        src = ASTSource(fn=cfg.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        with contextlib.redirect_stdout(log):  # the ptxas -v log (and, on a ptxas failure, the PTX)
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=cfg.options)
    except Exception as exc:  # report and go on: one broken kernel must not hide the others
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["error"] = f"{type(exc).__name__}: {exc}".strip()
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    text = log.getvalue()
    for key, pattern in _PTXAS_RE.items():
        found = pattern.search(text)
        row[key] = int(found.group(1)) if found else None
    row["n_spills"] = None if row["spill_store_bytes"] is None else row["spill_store_bytes"] // 4
    row["shared_bytes"] = kernel.metadata.shared
    row["num_warps"] = kernel.metadata.num_warps
    row["num_stages"] = kernel.metadata.num_stages
    limit = MAX_SHARED.get(arch)
    if limit is not None and kernel.metadata.shared > limit:
        # What CompiledKernel._init_handles raises on the device (OutOfResources).
        row["error"] = f"OutOfResources: shared memory, required {kernel.metadata.shared}, hardware limit {limit}"
        return row
    row["status"] = "ok"
    return row


def ptxas_versions(archs) -> dict:
    out = {}
    for arch in archs:
        tool = get_ptxas(arch)
        out[f"sm_{arch}"] = f"{Path(tool.path).name} {tool.version}"
    return out


def run(archs, quick: bool = False, kernels: list[str] | None = None, verbose: bool = True) -> list[dict]:
    if kernels:
        known = {cfg.kernel for arch in archs for cfg in all_configs(arch)}
        unknown = sorted(set(kernels) - known)
        if unknown:
            raise ValueError(f"unknown kernel(s) {', '.join(unknown)}; kernels: {', '.join(sorted(known))}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="triton_aot_") as cache, warnings.catch_warnings():
        knobs.cache.dir = cache  # every config is compiled anyway (compile_one): keep ~/.triton clean
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # triton 3.9's default-change notice
        for arch in archs:
            for cfg in all_configs(arch):
                if (quick and not cfg.quick) or (kernels and cfg.kernel not in kernels):
                    continue
                row = compile_one(cfg, arch)
                rows.append(row)
                if verbose:
                    print(f"  {row['arch']} {row['kernel']:<20} {cfg.label():<60} {row['status']} "
                          f"({row['compile_s']:.2f} s)", flush=True)
    return rows


def print_report(rows: list[dict]) -> None:
    flat = [{**r, "config": " ".join(f"{k}={v}" for k, v in r["case"].items())} for r in rows]
    _common.print_table(flat, ["kernel", "config", "arch", "status", "n_regs", "n_spills", "shared_bytes",
                               "compile_s"])
    for r in rows:
        if r["status"] != "ok":
            print(f"\n---- {r['kernel']} {r['arch']} {' '.join(f'{k}={v}' for k, v in r['case'].items())}\n"
                  f"{r['error']}")
    bad = sum(r["status"] != "ok" for r in rows)
    spilling = sum(bool(r.get("n_spills")) for r in rows)
    print(f"\n{len(rows) - bad}/{len(rows)} compiled, {bad} failed, {spilling} with register spills; "
          f"{sum(r['compile_s'] for r in rows):.1f} s of compiling")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (90 = H100/H200)")
    p.add_argument("--quick", action="store_true", help="a representative subset (a few configs per kernel)")
    p.add_argument("--kernel", nargs="*", default=None, help="only these kernels (names as in the table)")
    p.add_argument("--json", type=Path, default=None, help="also write the record to this path")
    p.add_argument("--no-save", action="store_true", help="do not write a record under benchmarks/results/")
    args = p.parse_args(argv)
    rows = run(args.arch, quick=args.quick, kernels=args.kernel)
    print_report(rows)
    config = {"archs": [f"sm_{a}" for a in args.arch], "quick": args.quick, "ptxas": ptxas_versions(args.arch),
              "sizes": {"logprobs": f"B={B_TOK} T={T_TOK} V in {list(VOCABS)}",
                        "linear_logprobs": f"N={B_TOK * T_TOK} H={HIDDEN} V in {list(VOCABS)}",
                        "rlmath": f"B={RL_B} T={RL_T}"},
              "max_shared_bytes": {f"sm_{a}": MAX_SHARED.get(a) for a in args.arch}}
    # The record's device is the machine that compiled (a CPU); the targets are each row's "arch".
    if not args.no_save:
        print("record:", _common.write_record("triton_aot", torch.device("cpu"), config, rows))
    if args.json is not None:
        args.json.write_text(json.dumps(_common.make_record("triton_aot", torch.device("cpu"), config, rows), indent=1))
    return rows


if __name__ == "__main__":
    rows = main()
    raise SystemExit(1 if any(r["status"] != "ok" for r in rows) else 0)
