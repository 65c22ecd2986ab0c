"""How each PPO phase grows at the shapes users run (issue 35): Qwen2-0.5B / Llama-3.2-1B-shaped models.

    python benchmarks/bench_scale.py                       # the default grid (below); record + PNG plots
    python benchmarks/bench_scale.py --quick               # 1 layer, R 32 -> 64, B 2 -> 4: a smoke run (~2 min)
    python benchmarks/bench_scale.py --iteration           # issue 35 part 4: one PPO iteration, Qwen2-0.5B + LoRA,
                                                           # all 24 layers, B = 16, R = 512 (see ITERATION)
    python benchmarks/bench_scale.py --models qwen2-0.5b --modes lora --dtypes bf16 --tokens 128,512,2048
    pytest benchmarks/bench_scale.py                       # CI: a tiny config through every phase, fits checked

Models are built from configs (random init, nothing downloaded) with the real hidden size, heads and
vocabulary of Qwen2-0.5B (V = 151,936, hidden 896, 24 layers) and Llama-3.2-1B (V = 128,256,
hidden 2,048, 16 layers); the sweeps run ``--layers`` of their layers (default 2, stated in the
record: the vocabulary-sized parts, embeddings and LM head, stay whole, and they are what grows
as tokens x V). ``full``: every weight trained (AdamW); ``lora``: rank-16 adapters on every block
linear (``rlhf_fast.models.lora``), the reference is the policy with its adapters off. The critic
is a value head on the policy's backbone (``ppo.critic: value_head``). bf16 runs only where the
CPU has native bf16 matmuls (``models.precision.cpu_has_fast_matmul``).

One iteration = PPOTrainer's phases without DeepSpeed (as ``bench_ppo.py``): ``generate``
(HybridEngine, fixed-length responses: EOS off, top-k / top-p off, temperature 0.7), ``score``
(a reward model of the same shape), ``logprobs`` (``ppo_core.score_logprobs``: old log-probs and
values, reference log-probs), ``advantages`` (``ppo_core.finish_experience``) and ``update``
(``ppo_core.ppo_update``, PRESETS["tldr"]: 4 epochs, ``--minibatches``, ``--micro-batch`` rows).
The prompt is ``--prompt-len`` random tokens. Per phase: seconds, peak resident memory (the
kernel's high-water mark, reset before each phase through /proc/self/clear_refs) and its rise
over the phase's start, model FLOPs (2 x weights x tokens per forward, the LM head on response
positions only, causal attention 2 x layers x width x T^2 per sequence; update: x3 full, x2 LoRA,
which computes no weight gradients for frozen layers) as GFLOP/s and percent of this machine's
measured GEMM rate in the same dtype and thread count (generate also: the weights' bytes read per
decode step, as GB/s and percent of the copy bandwidth: at small B decoding reads every weight
once per token). The peak rise counts memory the phase took from the OS: blocks under 32 MiB
freed by an earlier phase are reused without a rise (rlhf_fast/_malloc.py keeps them), while
anything of tokens x V size (logits, their gradient) is above that and shows in full: with
``--linear-logprobs false``; the default, the library's ``auto``, forms them in checkpointed row chunks
of at most ``ppo.logits_budget_mb`` (256 MB) once a call's would exceed it. Per axis (tokens R at fixed B; batch B at
fixed R) a least-squares slope of log(seconds) and log(peak rise) against log(axis): the growth
exponent, printed next to the work's own exponent. A phase whose time grows faster than its work,
or whose memory grows with tokens x V, is what this benchmark exists to find.

Timing on a shared machine is distorted: ``--under-load`` marks the record so.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from rlhf_fast.algos import PRESETS, Rollout  # noqa: E402
from rlhf_fast.config.sections import LoRAConfig  # noqa: E402
from rlhf_fast.engine import HybridEngine, SamplingParams  # noqa: E402
from rlhf_fast.models import Policy, RewardModel  # noqa: E402
from rlhf_fast.models.lora import AdaptersOff, add_lora  # noqa: E402
from rlhf_fast.models.precision import cpu_has_fast_matmul  # noqa: E402
from rlhf_fast.trainers import ppo_core  # noqa: E402

PHASES = ("generate", "score", "logprobs", "advantages", "update")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LR, ADAM_EPS, LORA_RANK = 1e-5, 1e-5, 16

# The published configs' shapes (hidden, layers, heads, kv heads, MLP width, vocabulary, RoPE base).
MODELS = {
    "qwen2-0.5b": ("qwen2", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                 intermediate_size=4864, vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                   intermediate_size=8192, vocab_size=128256, rope_theta=5e5, tie_word_embeddings=True)),
    "tiny": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=3001, tie_word_embeddings=True)),  # CI only
}


@dataclass(frozen=True)
class Case:
    """One measured setting. ``layers`` None: the model's own depth."""

    model: str
    mode: str  # "full" | "lora"
    dtype: str  # "fp32" | "bf16"
    B: int
    R: int
    P: int = 64
    layers: int | None = 2
    minibatches: int = 1
    micro_batch: int | None = None
    linear_logprobs: bool | str = "auto"  # ppo.use_linear_logprobs (the library's default)
    epochs: int = 4  # PRESETS["tldr"]'s; the sweeps default to 1 (the growth does not depend on it)

    def hf_config(self):
        from transformers import AutoConfig

        arch, kw = MODELS[self.model]
        kw = {**kw, **({"num_hidden_layers": self.layers} if self.layers else {})}
        return AutoConfig.for_model(arch, max_position_embeddings=max(4096, self.P + self.R), bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0, attention_dropout=0.0, **kw)


@dataclass
class Setup:
    case: Case
    policy: Policy
    ref: object
    reward_model: RewardModel
    engine: HybridEngine
    optimizer: torch.optim.Optimizer
    hp: object
    q_ids: torch.Tensor  # (B, P) int64
    q_mask: torch.Tensor  # (B, P) bool


def build(case: Case, seed: int = 0) -> Setup:
    cfg, dtype = case.hf_config(), DTYPES[case.dtype]
    policy = Policy.from_pretrained(cfg, value_head=True, seed=seed, dtype=dtype,
                                    use_linear_logprobs=case.linear_logprobs)
    if policy.value_head is not None:
        policy.value_head.to(dtype)
    if case.mode == "lora":
        add_lora(policy.model, LoRAConfig(rank=LORA_RANK, alpha=2.0 * LORA_RANK), field="bench_scale.lora")
        ref = AdaptersOff(policy)
    else:
        import copy

        ref = Policy(copy.deepcopy(policy.model), use_linear_logprobs=case.linear_logprobs).eval().requires_grad_(False)
    rm = RewardModel.from_pretrained(cfg, new_head=True, seed=seed + 1, dtype=dtype).eval().requires_grad_(False)
    hp = PRESETS["tldr"].replace(num_minibatches=case.minibatches, micro_batch_size=case.micro_batch,
                                 num_epochs=case.epochs)
    g = torch.Generator().manual_seed(seed)
    q_ids = torch.randint(3, cfg.vocab_size, (case.B, case.P), generator=g)
    engine = HybridEngine(policy, pad_token_id=0, max_batch_size=case.B, max_seq_len=case.P + case.R)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=LR, eps=ADAM_EPS)
    return Setup(case, policy, ref, rm, engine, opt, hp, q_ids, torch.ones_like(q_ids, dtype=torch.bool))


class PhaseMeter:
    """Wall seconds and peak resident memory of each phase. The peak is the kernel's high-water
    mark (VmHWM), reset at the phase's start by writing 5 to /proc/self/clear_refs (Linux >= 4.0);
    where that fails, ru_maxrss (the process's peak so far: a phase's own peak is then unknown)."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.exact = True

    @staticmethod
    def rss_mb(field: str = "VmRSS") -> float:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith(field + ":"):
                    return int(ln.split()[1]) / 1024
        raise RuntimeError(f"no {field} in /proc/self/status")

    def _reset_peak(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.exact = False

    def __call__(self, name: str):
        meter = self

        class _Phase:
            def __enter__(self):
                meter._reset_peak()
                self.start_mb, self.t0 = meter.rss_mb(), time.perf_counter()

            def __exit__(self, *exc):
                seconds = time.perf_counter() - self.t0
                peak = meter.rss_mb("VmHWM") if meter.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                meter.rows[name] = {"seconds": seconds, "peak_rss_mb": round(peak, 1),
                                    "peak_rise_mb": round(peak - self.start_mb, 1)}

        return _Phase()


def iteration(s: Setup, seed: int) -> dict:
    """One PPO iteration, phase by phase (what ``bench_ppo.fast_iteration`` runs, at these shapes)."""
    meter, hp, case = PhaseMeter(), s.hp, s.case
    generator = torch.Generator().manual_seed(seed)
    with meter("generate"), torch.no_grad():
        out = s.engine.generate(s.q_ids, s.q_mask, SamplingParams(max_new_tokens=case.R, temperature=hp.temperature,
                                                                  seed=seed))
    with meter("score"), torch.no_grad():
        seq, att = torch.cat([s.q_ids, out.responses], 1), torch.cat([s.q_mask, out.response_mask], 1)
        rollout = Rollout(s.q_ids, s.q_mask, out.responses, out.response_mask,
                          s.reward_model(seq, att.long()).scores.float())
    with meter("logprobs"):
        plan = ppo_core.first_epoch_plan(generator, case.B, hp)
        lp, ref_lp, values = ppo_core.score_logprobs(s.policy, None, s.ref, rollout, hp, plan=plan)
        rollout = rollout.replace(logprobs=lp, ref_logprobs=ref_lp, values=values)
    with meter("advantages"):
        exp = ppo_core.finish_experience(rollout, hp, kl_coef=hp.kl_init)
    with meter("update"):
        s.policy.train()
        ppo_core.ppo_update(ppo_core.TorchStepper(s.policy, s.optimizer, max_grad_norm=hp.max_grad_norm), exp, hp,
                            kl_coef=hp.kl_init, generator=generator)
        s.policy.eval()
    if int(out.response_mask.sum()) != case.B * case.R:
        raise RuntimeError("bench_scale: a response ended early; the FLOP counts assume B x R response tokens")
    return {**meter.rows, "_exact_peak": meter.exact}


def model_flops(case: Case) -> dict:
    """FLOPs of each phase for a plain implementation (see the module docstring)."""
    cfg = case.hf_config()
    d, L, V, ff = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    hd = d // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    body = L * (d * d * 2 + 2 * d * kv + 3 * d * ff)  # q, o; k, v; gate, up, down (norms negligible)
    B, T, R = case.B, case.P + case.R, case.R
    attn = 2 * L * d * T * T * B
    fwd = 2 * body * B * T + 2 * V * d * B * R + attn  # the LM head on the response positions only
    score = 2 * body * B * T + attn
    return {"generate": fwd, "score": score, "logprobs": 2 * fwd, "advantages": None,
            "update": case.epochs * (3 if case.mode == "full" else 2) * fwd}


def gemm_gflops(dtype: torch.dtype, n: int = 1024, d: int = 896, ff: int = 4864) -> float:
    """This machine's matmul rate (best of 5) at an MLP-shaped product, current thread count."""
    a, b = torch.randn(n, d, dtype=dtype), torch.randn(d, ff, dtype=dtype)
    a @ b
    best = min((lambda t0: (a @ b, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(5))
    return 2 * n * d * ff / best / 1e9


def fit_exponent(xs, ys) -> float | None:
    """Least-squares slope of log(y) against log(x) (None with fewer than 2 distinct x or y <= 0)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    return round(sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts), 3)


def measure(case: Case, reps: int, gemm: dict, warmup: int = 1) -> list[dict]:
    """Rows (one per phase) for one case: the best of ``reps`` timed iterations after ``warmup``
    untimed ones (first-call allocations, oneDNN primitives, the engine's buffers)."""
    rss0 = PhaseMeter.rss_mb()
    s = build(case)
    built_mb = PhaseMeter.rss_mb() - rss0
    for w in range(warmup):
        iteration(s, seed=12345 + w)
    runs = [iteration(s, seed=1000 + r) for r in range(reps)]
    flops = model_flops(case)
    rows = []
    for ph in PHASES:
        best = min(runs, key=lambda r: r[ph]["seconds"])[ph]
        row = {"impl": "rlhf_fast", "case": case.__dict__ | {"phase": ph}, "pass": ph, "phase": ph,
               "seconds": round(best["seconds"], 4), "p50_ms": round(best["seconds"] * 1e3, 1),
               "peak_rss_mb": max(r[ph]["peak_rss_mb"] for r in runs),
               "peak_rise_mb": max(r[ph]["peak_rise_mb"] for r in runs), "flops": flops[ph]}
        if ph == "generate":  # decode at small B reads every weight once per step: bandwidth, not FLOPs
            weight_bytes = sum(p.numel() * p.element_size() for p in s.policy.parameters())
            row["weight_gbps"] = round(weight_bytes * case.R / best["seconds"] / 1e9, 2)
            row["pct_copy_bw"] = round(100 * row["weight_gbps"] / _common.measured_cpu_bandwidth_gbps(), 1)
        if flops[ph]:
            row["gflops"] = round(flops[ph] / best["seconds"] / 1e9, 2)
            row["pct_gemm"] = round(100 * row["gflops"] / gemm[case.dtype], 1)
        rows.append(row)
    params = sum(p.numel() for p in s.policy.parameters())
    trainable = sum(p.numel() for p in s.policy.parameters() if p.requires_grad)
    peak = max(r[ph]["peak_rss_mb"] for r in runs for ph in PHASES)
    rows.append({"impl": "rlhf_fast", "case": case.__dict__ | {"phase": "memory"}, "pass": "memory", "phase": "memory",
                 "policy_params": params, "trainable_params": trainable, "built_rss_mb": round(built_mb, 1),
                 "peak_rss_mb": peak, "built_bytes_per_policy_param": round(built_mb * 2**20 / params, 2),
                 "peak_bytes_per_policy_param": round(peak * 2**20 / params, 2),
                 "exact_phase_peaks": all(r["_exact_peak"] for r in runs), "warmup": warmup, "reps": reps})
    return rows


def growth(rows: list[dict], axis: str) -> list[dict]:
    """Growth exponents along ``axis`` ("R" or "B") for every (model, mode, dtype) and phase:
    seconds, the work (FLOPs) and the peak memory rise."""
    out = []
    groups = {}
    for r in rows:
        if r["phase"] in PHASES and r["sweep"] == axis:
            c = r["case"]
            groups.setdefault((c["model"], c["mode"], c["dtype"], r["phase"]), []).append(r)
    for (model, mode, dtype, ph), rs in sorted(groups.items()):
        xs = [r["case"][axis] for r in rs]
        out.append({"axis": axis, "model": model, "mode": mode, "dtype": dtype, "phase": ph, "points": len(rs),
                    "time_exponent": fit_exponent(xs, [r["seconds"] for r in rs]),
                    "work_exponent": fit_exponent(xs, [r["flops"] for r in rs]) if rs[0]["flops"] else None,
                    "memory_exponent": fit_exponent(xs, [max(r["peak_rise_mb"], 1.0) for r in rs])})
    return out


def plot(rows: list[dict], axis: str, path: Path) -> Path | None:
    """Seconds and peak memory rise per phase against ``axis``, log-log, one panel pair per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r.get("sweep") == axis and r["phase"] in PHASES]
    settings = sorted({(r["case"]["model"], r["case"]["mode"], r["case"]["dtype"]) for r in sel})
    if not settings:
        return None
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.4 * len(settings)), squeeze=False)
    for (model, mode, dtype), (ax_t, ax_m) in zip(settings, axes):
        for ph in PHASES:
            rs = sorted((r for r in sel if (r["case"]["model"], r["case"]["mode"], r["case"]["dtype"], r["phase"])
                         == (model, mode, dtype, ph)), key=lambda r: r["case"][axis])
            xs = [r["case"][axis] for r in rs]
            ax_t.loglog(xs, [r["seconds"] for r in rs], "o-", label=ph)
            ax_m.loglog(xs, [max(r["peak_rise_mb"], 1.0) for r in rs], "o-", label=ph)
        for ax, what in ((ax_t, "seconds"), (ax_m, "peak RSS rise (MB)")):
            ax.set_xlabel({"R": "response tokens R", "B": "batch B"}[axis])
            ax.set_ylabel(what)
            ax.set_title(f"{model} {mode} {dtype}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@dataclass(frozen=True)
class Grid:
    """What one run sweeps (every field a command-line option)."""

    models: tuple = ("qwen2-0.5b", "llama-3.2-1b")
    modes: tuple = ("full", "lora")
    dtypes: tuple = ("fp32", "bf16")
    tokens: tuple = (128, 256, 512, 1024, 2048)  # R at B = tokens_batch
    tokens_batch: int = 8
    batches: tuple = (8, 16, 32, 64)  # B at R = batch_tokens
    batch_tokens: int = 128
    layers: int | None = 2
    prompt_len: int = 64
    micro_batch: int | None = 2
    epochs: int = 1
    linear_logprobs: bool | str = "auto"
    reps: int = 1


def cases(grid: Grid) -> list[tuple[str, Case]]:
    out = []
    for model in grid.models:
        for mode in grid.modes:
            for dtype in grid.dtypes:
                base = Case(model, mode, dtype, B=grid.tokens_batch, R=grid.tokens[0], P=grid.prompt_len,
                            layers=grid.layers, micro_batch=grid.micro_batch, linear_logprobs=grid.linear_logprobs,
                            epochs=grid.epochs)
                out += [("R", replace(base, R=R)) for R in grid.tokens]
                out += [("B", replace(base, B=B, R=grid.batch_tokens)) for B in grid.batches]
    return out


def measure_in_child(case: Case, reps: int, gemm: dict, warmup: int) -> list[dict]:
    """``measure`` in a fresh interpreter: each case's memory figures start from an empty heap (in
    one process, memory an earlier case freed and the allocator kept would hide a later case's
    rise), and a case that runs out of memory does not end the grid."""
    import json
    import subprocess

    spec = json.dumps({"case": case.__dict__, "reps": reps, "gemm": gemm, "warmup": warmup,
                       "threads": torch.get_num_threads()})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", spec], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-3:]
        return [{"impl": "rlhf_fast", "case": case.__dict__ | {"phase": "failed"}, "pass": "failed", "phase": "failed",
                 "returncode": out.returncode, "error": " | ".join(tail)}]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(spec_json: str) -> None:
    import json

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    rows = measure(Case(**spec["case"]), spec["reps"], spec["gemm"], spec["warmup"])
    print(json.dumps(rows))


def run_grid(grid: Grid, log=print, warmup: int = 1, isolate: bool = True) -> tuple[list[dict], dict]:
    dtypes = tuple(d for d in grid.dtypes if cpu_has_fast_matmul(d))
    grid = replace(grid, dtypes=dtypes)
    gemm = {d: round(gemm_gflops(DTYPES[d]), 1) for d in dtypes}
    rows, warmed = [], set()
    for sweep, case in cases(grid):
        t0 = time.perf_counter()
        setting = (case.model, case.mode, case.dtype)  # one warm-up per setting: the large cases take minutes
        got = (measure_in_child if isolate else measure)(case, grid.reps, gemm, 0 if setting in warmed else warmup)
        warmed.add(setting)
        for r in got:
            r["sweep"] = sweep
        rows += got
        log(f"[{sweep}] {case.model} {case.mode} {case.dtype} B={case.B} R={case.R}: " + ", ".join(
            f"{r['phase']} {r['seconds']:.2f}s/{r['peak_rss_mb']:.0f}MB" if r["phase"] in PHASES else
            f"{r['phase']} {r.get('error', '')}" for r in got if r["phase"] != "memory")
            + f"  ({time.perf_counter() - t0:.0f} s)")
    return rows, {"gemm_gflops": gemm, "grid": {k: v for k, v in grid.__dict__.items()}}


ITERATION = Case("qwen2-0.5b", "lora", "fp32", B=16, R=512, P=64, layers=None, micro_batch=4, epochs=4)
"""Issue 35 part 4: one PPO iteration of the Qwen2-0.5B-shaped policy with LoRA (value head on its
backbone), B = 16, R = 512, all 24 layers, PRESETS["tldr"] (4 epochs, 1 minibatch) in micro-batches
of 4 rows; the target is a peak resident memory within 24 GiB on 2 cores."""


def _mode(text: str) -> bool | str:
    return {"true": True, "false": False}.get(text, text)


def _csv(kind):
    return lambda text: tuple(kind(x) for x in text.split(",") if x)


def parse(argv=None):
    g = Grid()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv(str), default=g.models, help=f"of {list(MODELS)}")
    p.add_argument("--modes", type=_csv(str), default=g.modes, help="full,lora")
    p.add_argument("--dtypes", type=_csv(str), default=g.dtypes, help="fp32,bf16 (bf16 only with native bf16 matmuls)")
    p.add_argument("--tokens", type=_csv(int), default=g.tokens, help="the R axis (at B = --tokens-batch); empty: none")
    p.add_argument("--tokens-batch", type=int, default=g.tokens_batch)
    p.add_argument("--batches", type=_csv(int), default=g.batches, help="the B axis (at R = --batch-tokens); empty: none")
    p.add_argument("--batch-tokens", type=int, default=g.batch_tokens)
    p.add_argument("--layers", type=int, default=g.layers, help="layers of the model run (0: all of them)")
    p.add_argument("--prompt-len", type=int, default=g.prompt_len)
    p.add_argument("--micro-batch", type=int, default=g.micro_batch, help="rows per micro-batch (0: the minibatch)")
    p.add_argument("--epochs", type=int, default=None,
                   help="PPO epochs in the update (default: 1 in the sweeps; 4, the preset's, with --iteration)")
    p.add_argument("--linear-logprobs", default="auto", choices=("auto", "true", "false"),
                   help="ppo.use_linear_logprobs: auto (default: stored logits, in checkpointed row chunks above "
                        "ppo.logits_budget_mb), true (the fused op), false (stored whole: memory grows as tokens x V)")
    p.add_argument("--reps", type=int, default=g.reps, help="timed iterations per case (the best is kept)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations before the first case of each setting (default 1; --iteration: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="Qwen2-0.5B shape, 1 layer, R 32,64 / B 2,4, LoRA fp32")
    p.add_argument("--iteration", action="store_true", help="issue 35 part 4 (ITERATION), nothing else")
    p.add_argument("--under-load", action="store_true", help="mark the record as timed on a shared, loaded machine")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.models) - set(MODELS) or set(args.modes) - {"full", "lora"} or set(args.dtypes) - set(DTYPES)
    if unknown:
        p.error(f"unknown choice(s) {sorted(unknown)}")
    grid = Grid(models=args.models, modes=args.modes, dtypes=args.dtypes, tokens=args.tokens,
                tokens_batch=args.tokens_batch, batches=args.batches, batch_tokens=args.batch_tokens,
                layers=args.layers or None, prompt_len=args.prompt_len, micro_batch=args.micro_batch or None,
                epochs=args.epochs or g.epochs, linear_logprobs=_mode(args.linear_logprobs), reps=args.reps)
    if args.quick:
        grid = replace(grid, models=("qwen2-0.5b",), modes=("lora",), dtypes=("fp32",), tokens=(32, 64), tokens_batch=2,
                       batches=(2, 4), batch_tokens=32, layers=1, prompt_len=16)
    return args, grid


def main(argv=None):
    args, grid = parse(argv)
    if args.child:
        return _child(args.child)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    warmup = args.warmup if args.warmup is not None else (0 if args.iteration else 1)
    if args.iteration:
        case = replace(ITERATION, dtype=grid.dtypes[0], micro_batch=args.micro_batch or ITERATION.micro_batch,
                       linear_logprobs=_mode(args.linear_logprobs), epochs=args.epochs or ITERATION.epochs)
        gemm = {case.dtype: round(gemm_gflops(DTYPES[case.dtype]), 1)}
        rows = [{**r, "sweep": "iteration"} for r in measure_in_child(case, grid.reps, gemm, warmup)]
        peak = max((r.get("peak_rss_mb", 0) for r in rows if r["phase"] == "memory"), default=None)
        config = {"mode": "iteration", "case": case.__dict__, "gemm_gflops": gemm, "peak_rss_mb": peak,
                  "within_24_gib": None if peak is None else peak <= 24 * 1024}
    else:
        rows, config = run_grid(grid, warmup=warmup)
        config["growth"] = growth(rows, "R") + growth(rows, "B")
    config.update(torch_threads=torch.get_num_threads(), warmup=warmup, load_before=load_before,
                  load_after=os.getloadavg(), under_load=args.under_load, lora_rank=LORA_RANK,
                  critic="value head on the policy's backbone")
    _common.print_table([r for r in rows if r["phase"] in PHASES], ["sweep", "phase", "seconds", "peak_rss_mb",
                                                                      "peak_rise_mb", "gflops", "pct_gemm", "weight_gbps"])
    for g in config.get("growth", []):
        print(g)
    for r in rows:
        if r["phase"] == "memory":
            print({k: v for k, v in r.items() if k not in ("case", "impl", "pass")})
    if not args.no_save:
        path = _common.write_record("scale", torch.device("cpu"), config, rows)
        print("record:", path)
        for axis in ("R", "B"):
            png = plot(rows, axis, path.with_name(path.stem + f"_{axis}.png"))
            if png:
                print("plot:", png)


def test_bench_scale_tiny_grid(tmp_path):
    """Every phase runs on a tiny Llama (both modes), the growth fits and the plots come out."""
    grid = Grid(models=("tiny",), modes=("full", "lora"), dtypes=("fp32",), tokens=(4, 8), tokens_batch=2,
                batches=(2, 4), batch_tokens=4, layers=None, prompt_len=4, micro_batch=None, reps=1)
    rows, config = run_grid(grid, log=lambda *_: None, warmup=0, isolate=False)
    phases = [r for r in rows if r["phase"] in PHASES]
    assert len(phases) == 2 * 4 * len(PHASES) and all(r["seconds"] > 0 for r in phases)
    mem = [r for r in rows if r["phase"] == "memory"]
    assert {r["case"]["mode"] for r in mem} == {"full", "lora"}
    full, lora = (next(r for r in mem if r["case"]["mode"] == m) for m in ("full", "lora"))
    assert lora["trainable_params"] < full["trainable_params"] == full["policy_params"]
    fits = growth(rows, "R") + growth(rows, "B")
    assert len(fits) == 2 * 2 * len(PHASES)
    update_R = next(f for f in fits if (f["axis"], f["phase"], f["mode"]) == ("R", "update", "full"))
    assert 0.5 < update_R["work_exponent"] < 1.5  # FLOPs of (P + R) tokens: 8 -> 12 of them
    assert plot(rows, "R", tmp_path / "r.png").stat().st_size > 0


def test_a_case_in_a_child_process():
    case = Case("tiny", "lora", "fp32", B=2, R=4, P=4, layers=None, epochs=1)
    rows = measure_in_child(case, reps=1, gemm={"fp32": 1.0}, warmup=0)
    assert [r["phase"] for r in rows] == [*PHASES, "memory"] and rows[-1]["peak_rss_mb"] > rows[-1]["built_rss_mb"]


def test_fit_exponent_by_hand():
    assert fit_exponent([1, 2, 4], [3, 6, 12]) == 1.0
    assert fit_exponent([1, 2, 4], [1, 4, 16]) == 2.0
    assert fit_exponent([2, 2], [1, 2]) is None


if __name__ == "__main__":
    main()
