"""Packed vs padded: the PPO experience and update phases over a realistic length spread.

    python benchmarks/bench_packing.py            # this device's default size, writes a JSON record
    python benchmarks/bench_packing.py --quick    # tiny model, a smoke run
    pytest benchmarks/bench_packing.py --benchmark-disable   # CI: tiny run, packed == padded checked

The same rollout goes through three implementations, alternating inside every repetition (so load
from other processes on a shared machine hits them alike), from the same weights:
  padded          ``ppo.packing: false``: every forward over the [b, Q + R] batch (left-padded
                  prompts, right-padded responses), micro-batches of ``micro`` rows
  packed          ``ppo.packing: true`` (rlhf_fast/models/packing.py): the valid tokens only,
                  first-fit bins as wide as the longest sequence, attention confined to each
                  sequence (transformers' packed-sequence mask); the same row micro-batches
  packed_tokens   packed, micro-batches by ``algo.max_tokens_per_micro_batch`` (rlhf_fast/trainers/token_budget.py):
                  ``micro`` x the mean row's tokens
Phases (PPOTrainer's ``time/*_s`` names): ``logprobs`` = ``ppo_core.score_logprobs`` (old
log-probs + values from the policy with a value head, reference log-probs: two forwards);
``train`` = ``ppo_core.ppo_update`` (1 epoch x 1 minibatch here, forward + backward + AdamW).
Lengths: prompt and response lengths drawn uniformly from [8, 512] (cpu / gpu) or [2, 16]
(quick), so Q and R are near their maxima and about half of the padded batch is padding.
Physics: ``tokens_per_s`` counts the valid (query + response) tokens of the batch per second of
the phase, for every implementation alike (so its ratio is the speed ratio); ``padded_tokens``
is what the padded layout computes over. ``peak_extra_mb``: the peak memory of one call of the
phase beyond what existed before it (CUDA: the allocator's peak; CPU: the profiler's
allocation events). One torch thread on a CPU (``--threads``; see bench_ppo.py).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from rlhf_fast.algos import PRESETS, PPOHyperParams, Rollout, RunningMoments  # noqa: E402
from rlhf_fast.models import Policy  # noqa: E402
from rlhf_fast.models.packing import set_packing  # noqa: E402
from rlhf_fast.tasks import tiny_config  # noqa: E402
from rlhf_fast.trainers import ppo_core  # noqa: E402

IMPLS = ("padded", "packed", "packed_tokens")
PHASES = ("logprobs", "train")
SIZES = {  # arch size, rows, length range, rows per micro-batch, vocabulary
    "quick": dict(size="test", B=8, lo=2, hi=16, micro=4, vocab=97, reps=2),
    "cpu": dict(size="task", B=16, lo=8, hi=512, micro=8, vocab=631, reps=2),
    "gpu": dict(size="task", B=64, lo=8, hi=512, micro=16, vocab=32000, reps=5),
}


@dataclass
class Bench:
    policy: Policy
    ref: Policy
    rollout: Rollout
    hp: PPOHyperParams
    micro: int
    device: torch.device


def make_rollout(B: int, lo: int, hi: int, vocab: int, device, seed: int = 0) -> Rollout:
    """Left-padded prompts and right-padded responses, lengths uniform in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    ql, rl = torch.randint(lo, hi + 1, (B,), generator=g), torch.randint(lo, hi + 1, (B,), generator=g)
    Q, R = int(ql.max()), int(rl.max())
    qm = torch.arange(Q)[None] >= (Q - ql)[:, None]
    rm = torch.arange(R)[None] < rl[:, None]
    q = torch.randint(3, vocab, (B, Q), generator=g).masked_fill(~qm, 0)
    r = torch.randint(3, vocab, (B, R), generator=g).masked_fill(~rm, 0)
    scores = torch.randn(B, generator=g)
    return Rollout(q, qm, r, rm, scores).map(lambda t: t.to(device))


def build(size: str, device: torch.device, seed: int = 0) -> Bench:
    s = SIZES[size]
    cfg = tiny_config("llama", vocab_size=s["vocab"], size=s["size"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      max_position_embeddings=2048)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    policy = Policy.from_pretrained(cfg, seed=seed, value_head=True, attn_implementation="sdpa", dtype=dtype)
    with torch.no_grad():
        policy.value_head.linear.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    policy.to(device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    hp = PRESETS["tldr"].replace(num_epochs=1, num_minibatches=1, micro_batch_size=s["micro"])
    return Bench(policy, ref, make_rollout(s["B"], s["lo"], s["hi"], s["vocab"], device, seed), hp, s["micro"], device)


def _hp(b: Bench, impl: str) -> PPOHyperParams:
    if impl != "packed_tokens":
        return b.hp
    mean = float(ppo_core.row_tokens(b.rollout).float().mean())
    return b.hp.replace(max_tokens_per_micro_batch=int(b.micro * mean))


def _models(b: Bench, impl: str):
    policy, ref = copy.deepcopy(b.policy), b.ref
    set_packing(impl != "padded", "ppo.packing", policy, ref)
    return policy, ref


def experience(b: Bench, impl: str, policy, ref, gen_seed: int = 0) -> Rollout:
    hp = _hp(b, impl)
    gen = torch.Generator().manual_seed(gen_seed)
    plan = ppo_core.first_epoch_plan(gen, b.rollout.batch_size, hp, device=b.device, tokens=ppo_core.row_tokens(b.rollout))
    lp, ref_lp, values = ppo_core.score_logprobs(policy, None, ref, b.rollout, hp, plan=plan)
    return b.rollout.replace(logprobs=lp, ref_logprobs=ref_lp, values=values)


def update(b: Bench, impl: str, policy, exp: Rollout, gen_seed: int = 0):
    hp = _hp(b, impl)
    exp = ppo_core.finish_experience(exp, hp, kl_coef=0.05, score_stats=RunningMoments())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5, eps=1e-5)
    st = ppo_core.TorchStepper(policy, opt, max_grad_norm=hp.max_grad_norm)
    return ppo_core.ppo_update(st, exp, hp, kl_coef=0.05, generator=torch.Generator().manual_seed(gen_seed))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one(b: Bench, impl: str) -> dict:
    policy, ref = _models(b, impl)
    _sync(b.device)
    t0 = time.perf_counter()
    exp = experience(b, impl, policy, ref)
    _sync(b.device)
    t1 = time.perf_counter()
    update(b, impl, policy, exp)
    _sync(b.device)
    return {"logprobs": (t1 - t0) * 1e3, "train": (time.perf_counter() - t1) * 1e3}


def run(size: str, device: torch.device, reps: int | None = None, *, memory: bool = True):
    b = build(size, device)
    reps = reps or SIZES[size]["reps"]
    for impl in IMPLS:  # warm-up (untimed)
        _one(b, impl)
    times = {(i, p): [] for i in IMPLS for p in PHASES}
    for rep in range(reps):
        order = IMPLS if rep % 2 == 0 else IMPLS[::-1]
        for impl in order:
            for phase, ms in _one(b, impl).items():
                times[(impl, phase)].append(ms)
    dev = _common.device_info(device)
    tokens = int(ppo_core.row_tokens(b.rollout).sum())
    padded_tokens = b.rollout.batch_size * b.rollout.sequences.shape[1]
    rows = []
    for impl in IMPLS:
        peaks = _peaks(b, impl, device) if memory else {}
        for phase in PHASES:
            ts = times[(impl, phase)]
            q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else ts * 9
            timing = {"p20_ms": q[1], "p50_ms": statistics.median(ts), "p80_ms": q[7], "reps": len(ts)}
            base = statistics.median(times[("padded", phase)])
            rows.append(_common.result_row(
                impl, {"B": b.rollout.batch_size, "T": b.rollout.sequences.shape[1]}, phase, timing, dev,
                peak_extra=peaks.get(phase), tokens_per_s=round(tokens / (timing["p50_ms"] / 1e3), 1),
                speedup=round(base / timing["p50_ms"], 3)))
    s = SIZES[size]
    config = {"size": size, "arch": f"llama size={s['size']}", "vocab": s["vocab"], "B": b.rollout.batch_size,
              "lengths": f"prompt and response uniform in [{s['lo']}, {s['hi']}]", "valid_tokens": tokens,
              "padded_tokens": padded_tokens, "micro_rows": b.micro,
              "max_tokens_per_micro_batch": _hp(b, "packed_tokens").max_tokens_per_micro_batch,
              "hp": "PRESETS['tldr'], 1 epoch x 1 minibatch", "reps": reps, "torch_threads": torch.get_num_threads(),
              "order": "alternating within each repetition"}
    return rows, config


def _peaks(b: Bench, impl: str, device) -> dict:
    policy, ref = _models(b, impl)
    out = {}
    box = {}
    out["logprobs"] = _common.peak_extra_bytes(lambda: box.update(exp=experience(b, impl, policy, ref)), device)
    out["train"] = _common.peak_extra_bytes(lambda: update(b, impl, policy, box["exp"]), device)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1: see bench_ppo.py)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-save", action="store_true", help="do not write a JSON record")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    size = "quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")
    rows, config = run(size, device, args.reps, memory=not args.no_memory)
    print(f"PPO experience and update, packed vs padded, {config}")
    _common.print_table(rows, ["impl", "pass", "p20_ms", "p50_ms", "p80_ms", "speedup", "tokens_per_s", "peak_extra_mb"])
    if not args.no_save:
        print("record:", _common.write_record("packing", device, config, rows))
    return rows


# ---- pytest: packed == padded; the benchmark runs at the tiny size ---------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    with _common.torch_threads(1):
        yield


def test_bench_packing_same_math():
    b = build("quick", torch.device("cpu"))
    out = {}
    for impl in IMPLS:
        policy, ref = _models(b, impl)
        exp = experience(b, impl, policy, ref)
        out[impl] = (exp, update(b, impl, policy, exp), policy)
    m = b.rollout.response_mask
    for impl in ("packed", "packed_tokens"):
        exp, stats, policy = out[impl]
        e0, s0, p0 = out["padded"]
        for name in ("logprobs", "ref_logprobs", "values"):
            torch.testing.assert_close(getattr(exp, name)[m], getattr(e0, name)[m], rtol=1e-4, atol=1e-5)
        for a, c in zip(stats, s0):
            for k, v in c.to_dict().items():
                assert abs(a.to_dict()[k] - v) <= 1e-4 * abs(v) + 1e-5, (impl, k, a.to_dict()[k], v)
        for (name, pa), pb in zip(policy.named_parameters(), p0.parameters()):
            torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)


def test_bench_packing_record(tmp_path):
    rows, config = run("quick", torch.device("cpu"), reps=1, memory=False)
    assert {(r["impl"], r["pass"]) for r in rows} == {(i, p) for i in IMPLS for p in PHASES}
    assert all(r["p50_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert config["valid_tokens"] < config["padded_tokens"]
    path = _common.write_record("packing", torch.device("cpu"), config, rows, out_dir=tmp_path)
    assert path.exists()


if __name__ == "__main__":
    main()
