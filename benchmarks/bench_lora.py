"""One PPO iteration with LoRA vs full fine-tuning on the same model: memory and time side by side.

    python benchmarks/bench_lora.py            # this device's default size, writes a JSON record
    python benchmarks/bench_lora.py --quick    # tiny model, a smoke run
    python benchmarks/bench_lora.py --rank 64  # another adapter rank
    pytest benchmarks/bench_lora.py --benchmark-disable   # CI: tiny run, the memory accounting checked

Both sides: the same policy (value head, PRESETS["tldr"] math, 4 epochs x 1 minibatch), reward
model, left-padded prompts of the built-in task, responses of exactly R tokens, AdamW (lr 1e-5,
eps 1e-5); the iteration is ``PPOTrainer``'s without DeepSpeed (bench_ppo.py's ``rlhf_fast``
side): HybridEngine generate -> reward model -> ``ppo_core.score_logprobs`` ->
``finish_experience`` -> ``ppo_update`` with a ``TorchStepper``.

  full   every policy weight trained; the reference is a frozen copy of the policy (PPOTrainer
         without ``ppo.lora``)
  lora   ``models.lora.add_lora`` (peft, rank ``--rank``, the architecture's default targets);
         the optimizer holds the adapters and the value head only; the reference is
         ``lora.AdaptersOff(policy)``: the same weights with the adapters disabled, no copy

Memory (docs/architecture.md "Benchmarks": what is held, not only the timer): ``weights_mb``, the
distinct parameter / buffer storages of policy and reference (the reference copy shows here);
``optimizer_mb``, AdamW's state after a warm-up iteration; ``reward_mb``, the reward model (the
same on both sides); ``resident_mb``, their sum; ``peak_extra_mb``, the peak allocated during one
iteration beyond that (activations, gradients, logits: ``_common.peak_extra_bytes``, the CUDA
allocator's peak or, on a CPU, the profiler's allocation events); ``peak_mb`` = resident + peak
extra. Time: p20 / p50 / p80 of whole iterations, the two sides alternating inside each repetition
(which goes first alternates too), one untimed warm-up each; ``tokens_per_s`` = B * R / p50;
``speedup`` = full / lora of the p50s.

Sizes as bench_ppo.py: quick (llama size "test", B 8, R 8), cpu (llama size "task", B 32, R 24,
float32), gpu (a Qwen2-0.5B-shaped config, random weights, B 64, R 128, bfloat16 weights, pure-bf16
AdamW: a timing set-up, not a training recipe). On a CPU one torch thread by default (bench_ppo.py
explains why).
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from bench_ppo import SIZES, Clock, _quantiles  # noqa: E402

from rlhf_fast.algos import PRESETS, Rollout  # noqa: E402
from rlhf_fast.config import LoRAConfig  # noqa: E402
from rlhf_fast.engine import SamplingParams, make_generator  # noqa: E402
from rlhf_fast.models import Policy, RewardModel, lora  # noqa: E402
from rlhf_fast.tasks import get_task, tiny_config  # noqa: E402
from rlhf_fast.trainers import ppo_core  # noqa: E402

IMPLS = ("full", "lora")
LR, ADAM_EPS = 1e-5, 1e-5


@dataclass
class Side:
    """One set-up: the trained policy, its reference, its optimizer and its generator."""

    policy: Policy
    ref: object
    opt: torch.optim.Optimizer
    engine: object


@dataclass
class Bench:
    sides: dict  # impl -> Side
    reward_model: RewardModel
    q_ids: torch.Tensor  # (B, P) left-padded prompts
    q_mask: torch.Tensor  # (B, P) bool
    R: int
    hp: object
    device: torch.device
    rank: int


def build(size: str, device: torch.device, *, rank: int = 16, seed: int = 0) -> Bench:
    arch, cfg_size, overrides, B, R, dtype, _ = SIZES[size]
    task = get_task("tiny_sentiment")
    tok = task.tokenizer
    cfg = tiny_config(arch, tokenizer=tok, size=cfg_size, **overrides)
    rm = RewardModel.from_pretrained(cfg, new_head=True, seed=seed + 1, dtype=dtype).to(device).eval().requires_grad_(False)
    texts = [r["prompt"] for r in task.prompt_records("train")[:B]]
    enc = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
    P = max(map(len, enc))
    q_ids = torch.tensor([[tok.pad_token_id] * (P - len(e)) + e for e in enc], device=device)
    q_mask = torch.tensor([[0] * (P - len(e)) + [1] * len(e) for e in enc], device=device).bool()
    sides = {}
    for impl in IMPLS:
        policy = Policy.from_pretrained(cfg, value_head=True, seed=seed, dtype=dtype).to(device)
        policy.model.generation_config.eos_token_id = None  # fixed-length responses
        if impl == "lora":
            lora.add_lora(policy.model, LoRAConfig(rank=rank, alpha=2.0 * rank), field="bench.lora")
            ref = lora.AdaptersOff(policy)
        else:
            ref = Policy(copy.deepcopy(policy.model)).eval().requires_grad_(False)
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=LR, eps=ADAM_EPS)
        engine = make_generator(policy, pad_token_id=tok.pad_token_id, max_batch_size=B, max_seq_len=P + R)
        sides[impl] = Side(policy, ref, opt, engine)
    return Bench(sides, rm, q_ids, q_mask, R, PRESETS["tldr"].replace(), device, rank)


def iteration(b: Bench, impl: str, seed: int, clock: Clock):
    s, hp = b.sides[impl], b.hp
    generator = torch.Generator().manual_seed(seed)
    with clock("generate"):
        out = s.engine.generate(b.q_ids, b.q_mask, SamplingParams(
            max_new_tokens=b.R, do_sample=True, temperature=hp.temperature, top_k=0, top_p=1.0, seed=seed))
    with clock("score"), torch.no_grad():
        seq = torch.cat([b.q_ids, out.responses], 1)  # (B, P + R)
        att = torch.cat([b.q_mask, out.response_mask], 1)
        rollout = Rollout(b.q_ids, b.q_mask, out.responses, out.response_mask,
                          b.reward_model(seq, att.long()).scores.float())
    with clock("logprobs"):
        plan = ppo_core.first_epoch_plan(generator, rollout.batch_size, hp, device=b.device)
        lp, ref_lp, values = ppo_core.score_logprobs(s.policy, None, s.ref, rollout, hp, plan=plan)  # (B, R) each
    with clock("advantages"):
        exp = ppo_core.finish_experience(rollout.replace(logprobs=lp, ref_logprobs=ref_lp, values=values), hp,
                                         kl_coef=hp.kl_init)
    with clock("train"):
        s.policy.train()
        stats = ppo_core.ppo_update(ppo_core.TorchStepper(s.policy, s.opt, max_grad_norm=hp.max_grad_norm), exp, hp,
                                    kl_coef=hp.kl_init, generator=generator)
    return exp, stats


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a shared weight counts once)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def memory(b: Bench, impl: str) -> dict:
    s = b.sides[impl]
    weights = [*s.policy.parameters(), *s.policy.buffers(), *s.ref.parameters()]
    if hasattr(s.ref, "buffers"):
        weights += list(s.ref.buffers())
    state = [v for st in s.opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    rm = [*b.reward_model.parameters(), *b.reward_model.buffers()]
    mb = lambda n: round(n / 2**20, 3)  # noqa: E731
    out = {"weights_mb": mb(_storage_bytes(weights)), "optimizer_mb": mb(_storage_bytes(state)),
           "reward_mb": mb(_storage_bytes(rm)),
           "trainable_params": sum(p.numel() for p in s.policy.parameters() if p.requires_grad)}
    out["resident_mb"] = round(out["weights_mb"] + out["optimizer_mb"] + out["reward_mb"], 3)
    return out


def run(size: str, device: torch.device, reps: int | None = None, rank: int = 16):
    b = build(size, device, rank=rank)
    dev = _common.device_info(device)
    reps = reps or SIZES[size][6]
    for impl in IMPLS:  # untimed warm-up: compiles, and Adam's state exists afterwards
        iteration(b, impl, 12345, Clock(device))
    mem = {impl: memory(b, impl) for impl in IMPLS}
    for impl in IMPLS:
        mem[impl]["peak_extra_mb"] = round(
            _common.peak_extra_bytes(lambda: iteration(b, impl, 777, Clock(device)), device) / 2**20, 3)
        mem[impl]["peak_mb"] = round(mem[impl]["resident_mb"] + mem[impl]["peak_extra_mb"], 3)
    samples = {impl: [] for impl in IMPLS}
    for r in range(reps):
        for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1]):
            clock = Clock(device)
            iteration(b, impl, 1000 + r, clock)
            samples[impl].append(sum(clock.seconds.values()))
    B, P = b.q_ids.shape
    policy = b.sides["full"].policy
    case = {"size": size, "V": policy.config.vocab_size, "B": B, "P": P, "R": b.R,
            "dtype": str(next(policy.parameters()).dtype).replace("torch.", ""), "rank": rank}
    full_p50 = _quantiles(samples["full"])["p50_ms"]
    rows = []
    for impl in IMPLS:
        t = _quantiles(samples[impl])
        extra = {**mem[impl], "tokens_per_s": round(B * b.R / (t["p50_ms"] / 1e3), 1)}
        if impl == "lora":
            extra["speedup"] = round(full_p50 / t["p50_ms"], 3)
            extra["memory_saved_mb"] = round(mem["full"]["peak_mb"] - mem["lora"]["peak_mb"], 3)
        rows.append(_common.result_row(impl, case, "iteration", t, dev, **extra))
    config = {"size": size, "arch": SIZES[size][0], "vocab": policy.config.vocab_size,
              "params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 2), "B": B, "P": P, "R": b.R,
              "reps": reps, "rank": rank, "hp": "PRESETS['tldr']", "optimizer": f"AdamW(lr={LR}, eps={ADAM_EPS})",
              "torch_threads": torch.get_num_threads(), "order": "alternating within each repetition"}
    return rows, config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default per size)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 * rank)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1: bench_ppo.py says why)")
    p.add_argument("--no-save", action="store_true", help="do not write a JSON record")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    size = "quick" if args.quick else ("gpu" if device.type == "cuda" else "cpu")
    rows, config = run(size, device, args.reps, args.rank)
    print(f"one PPO iteration, LoRA vs full fine-tuning, {config}")
    _common.print_table(rows, ["impl", "trainable_params", "weights_mb", "optimizer_mb", "resident_mb",
                               "peak_extra_mb", "peak_mb", "p50_ms", "speedup", "tokens_per_s"])
    if not args.no_save:
        print("record:", _common.write_record("lora", device, config, rows))
    return rows


# ---- pytest: the memory accounting at the tiny size ----------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    with _common.torch_threads(1):
        yield


def test_bench_lora_record(tmp_path):
    rows, config = run("quick", torch.device("cpu"), reps=1, rank=4)
    full, low = (next(r for r in rows if r["impl"] == impl) for impl in IMPLS)
    policy = build("quick", torch.device("cpu"), rank=4).sides["full"].policy
    weights = _storage_bytes([*policy.parameters(), *policy.buffers()]) / 2**20
    value_head = sum(p.numel() for p in policy.value_head.parameters())
    # full: policy + a reference copy (without the value head); LoRA: the policy and its adapters only
    assert full["weights_mb"] > 1.9 * weights > low["weights_mb"] >= weights
    assert low["trainable_params"] < 0.2 * full["trainable_params"] and low["trainable_params"] > value_head
    assert low["optimizer_mb"] < 0.2 * full["optimizer_mb"]
    assert full["reward_mb"] == low["reward_mb"] > 0
    assert low["memory_saved_mb"] > 0 and all(r["p50_ms"] > 0 and r["peak_extra_mb"] > 0 for r in rows)
    path = _common.write_record("lora", torch.device("cpu"), config, rows, out_dir=tmp_path)
    assert path.exists()


if __name__ == "__main__":
    main()
