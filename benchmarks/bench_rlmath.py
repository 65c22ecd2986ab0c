"""KL penalty -> reward shaping -> GAE -> advantage whitening: rlhf_fast vs the peers' loops.

    python benchmarks/bench_rlmath.py            # [B, T] = [64, 512], [512, 1024], [256, 8192]; JSON record
    python benchmarks/bench_rlmath.py --quick    # small sizes, a smoke run
    pytest benchmarks/bench_rlmath.py --benchmark-disable   # CI: every path runs once, checked

Implementations (float32 inputs, right-padded masks with lengths in [T/2, T], so that every peer's
semantics agree and the outputs can be checked against each other):
  rlhf_fast  ops.shape_rewards / ops.gae / ops.masked_whiten (C++ on CPU, Triton on CUDA)
  reference  rlhf_fast.reference (plain torch, float32; its GAE is a mask-aware Python loop)
  trl        TRL PPOTrainer style: k1 KL, score scattered by index, unmasked reversed GAE loop over
             mask-zeroed rewards/values, masked_whiten (unbiased, var + 1e-8)
  verl       verl style: k1 KL * mask, score placed per row in a Python loop (reward manager),
             mask-aware GAE loop (next value and running advantage carried across masked tokens),
             masked_whiten
  openrlhf   OpenRLHF style: k1 log-ratio * mask clamped to +-10, score scattered at the last
             action index, GAE loop over mask-multiplied rewards/values, global biased whitening
             with clamp(var, 1e-8)
The peers' code is our own, written from their semantics: TRL (https://github.com/huggingface/trl,
trl/trainer/ppo_trainer.py), verl (https://github.com/volcengine/verl, verl/trainer/ppo/core_algos.py
and verl/utils/torch_functional.py), OpenRLHF (https://github.com/OpenRLHF/OpenRLHF,
openrlhf/models/utils.py and openrlhf/trainer/ppo_utils/experience_maker.py).

Bytes per token (the ideal, one pass each; GB/s is over these): shaping reads logprobs, ref
(4 + 4) and the mask (1) and writes rewards and kl (4 + 4) = 17; GAE reads rewards, values, mask
and writes advantages and returns = 17; whitening reads x and mask twice and writes once = 14;
the pipeline is the sum, 48.
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
from rlhf_fast.reference import peers  # noqa: E402

KL_COEF, GAMMA, LAM = 0.05, 1.0, 0.95
BYTES_PER_TOKEN = {"shaping": 17, "gae": 17, "whiten": 14, "pipeline": 48}


def make_inputs(B: int, T: int, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(T // 2, 1), T + 1, (B,), generator=g)
    mask = torch.arange(T) < lengths[:, None]
    d = {
        "scores": torch.randn(B, generator=g),
        "logprobs": -torch.rand(B, T, generator=g) * 3,
        "ref_logprobs": -torch.rand(B, T, generator=g) * 3,
        "values": torch.randn(B, T, generator=g),
        "rewards": torch.randn(B, T, generator=g) * 0.1,
        "mask": mask,
        "lengths": lengths,
    }
    return {k: v.to(device) for k, v in d.items()}


# ---- peers, written from their semantics ------------------------------------------------------

def _trl_shaping(x):
    kl = x["logprobs"] - x["ref_logprobs"]
    non_score_reward = -KL_COEF * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    rewards[actual_start, x["lengths"] - 1] += x["scores"]  # this project's score position (not len + 1)
    return rewards, kl


def _trl_gae(rewards, values, mask):
    return peers.trl_gae(rewards, values, mask, GAMMA, LAM)


def _tv_masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _tv_masked_whiten(values, mask, shift_mean=True):
    """TRL's and verl's masked_whiten (identical): unbiased variance, rsqrt(var + 1e-8)."""
    mean = _tv_masked_mean(values, mask)
    centered = values - mean
    variance = _tv_masked_mean(centered**2, mask)
    mask_sum = mask.sum()
    variance = variance * (mask_sum / (mask_sum - 1))
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def _verl_shaping(x):
    mask = x["mask"].float()
    token_level_scores = torch.zeros_like(x["logprobs"])
    lengths = x["lengths"].tolist()  # CPU-GPU sync point (the reward manager works per sample)
    for i in range(token_level_scores.shape[0]):
        token_level_scores[i, lengths[i] - 1] = x["scores"][i]
    kld = (x["logprobs"] - x["ref_logprobs"]) * mask
    return token_level_scores - KL_COEF * kld, kld


def _verl_gae(token_level_rewards, values, response_mask):
    response_mask = response_mask.float()
    nextvalues = 0
    lastgaelam = 0
    advantages_reversed = []
    gen_len = token_level_rewards.shape[-1]
    for t in reversed(range(gen_len)):
        delta = token_level_rewards[:, t] + GAMMA * nextvalues - values[:, t]
        lastgaelam_ = delta + GAMMA * LAM * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


def _openrlhf_shaping(x):
    mask = x["mask"]
    log_ratio = (x["logprobs"].float() - x["ref_logprobs"].float()) * mask
    kl = log_ratio.clamp(min=-10, max=10)
    kl_reward = -KL_COEF * kl
    eos_indices = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
    last_reward = torch.zeros_like(kl).scatter_(dim=1, index=eos_indices, src=x["scores"].unsqueeze(1).to(kl.dtype))
    return last_reward + kl_reward, kl


def _openrlhf_whiten(x, mask):
    num = mask.sum()
    mean = (x * mask).sum() / num
    var = ((x - mean).pow(2) * mask).sum() / num
    rstd = var.clamp(min=1e-8).rsqrt()
    return (x - mean) * rstd


# ---- the four stages for every implementation -------------------------------------------------

def _fast_shaping(x):
    return ops.shape_rewards(x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"], kl_coef=KL_COEF)


def _ref_shaping(x):
    return ref.shape_rewards(x["scores"], x["logprobs"], x["ref_logprobs"], x["mask"], kl_coef=KL_COEF)


STAGES = {
    "rlhf_fast": {
        "shaping": _fast_shaping,
        "gae": lambda r, v, m: ops.gae(r, v, m, gamma=GAMMA, lam=LAM),
        "whiten": lambda a, m: ops.masked_whiten(a, m),
    },
    "reference": {
        "shaping": _ref_shaping,
        "gae": lambda r, v, m: ref.gae(r, v, m, gamma=GAMMA, lam=LAM),
        "whiten": lambda a, m: ref.masked_whiten(a, m),
    },
    "trl": {"shaping": _trl_shaping, "gae": _trl_gae,
            "whiten": lambda a, m: torch.masked_fill(_tv_masked_whiten(a, m), ~m, 0)},
    "verl": {"shaping": _verl_shaping, "gae": _verl_gae, "whiten": lambda a, m: _tv_masked_whiten(a, m) * m},
    "openrlhf": {"shaping": _openrlhf_shaping, "gae": lambda r, v, m: peers.openrlhf_gae(r, v, m, GAMMA, LAM),
                 "whiten": lambda a, m: _openrlhf_whiten(a, m) * m},
}


def _pipeline(stages, x):
    rewards, _ = stages["shaping"](x)
    adv, ret = stages["gae"](rewards, x["values"], x["mask"])
    return stages["whiten"](adv, x["mask"]), ret


def _calls(stages, x) -> dict:
    return {
        "shaping": lambda: stages["shaping"](x),
        "gae": lambda: stages["gae"](x["rewards"], x["values"], x["mask"]),
        "whiten": lambda: stages["whiten"](x["values"], x["mask"]),
        "pipeline": lambda: _pipeline(stages, x),
    }


def run_case(B: int, T: int, device, impls=None, reps: int = 20, loop_reps: int = 3) -> list[dict]:
    dev = _common.device_info(device)
    x = make_inputs(B, T, device)
    rows = []
    for impl in impls or list(STAGES):
        slow = impl not in ("rlhf_fast",)  # the Python-loop implementations: few repetitions
        for stage, fn in _calls(STAGES[impl], x).items():
            with torch.no_grad():
                t = _common.time_fn(fn, device, reps=loop_reps if slow else reps, warmup=1 if slow else 3)
            rows.append(_common.result_row(impl, {"B": B, "T": T}, stage, t, dev,
                                           bytes_moved=BYTES_PER_TOKEN[stage] * B * T))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-save", action="store_true", help="do not write a JSON record")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        cases, reps, loop_reps = [(64, 512), (512, 1024)], 10, 2
    else:
        cases = [(64, 512), (512, 1024), (256, 8192)]
        reps, loop_reps = (50, 5) if device.type == "cuda" else (20, 3)
    rows = []
    for B, T in cases:
        print(f"[B, T] = [{B}, {T}] ...", flush=True)
        rows += run_case(B, T, device, reps=reps, loop_reps=loop_reps)
    flat = [{**r, **r["case"]} for r in rows]
    _common.print_table(flat, ["impl", "B", "T", "pass", "p20_ms", "p50_ms", "p80_ms", "gbps", "pct_peak_bandwidth"])
    print("\nspeed-up of rlhf_fast (p50 ratio):")
    for B, T in cases:
        for stage in BYTES_PER_TOKEN:
            sel = {r["impl"]: r["p50_ms"] for r in flat if (r["B"], r["T"], r["pass"]) == (B, T, stage)}
            ours = sel["rlhf_fast"]
            print(f"  [{B}, {T}] {stage:9s}: " + ", ".join(f"{k} {v / ours:.1f}x" for k, v in sel.items() if k != "rlhf_fast"))
    if not args.no_save:
        config = {"cases": cases, "reps": reps, "loop_reps": loop_reps, "gamma": GAMMA, "lam": LAM,
                  "kl_coef": KL_COEF, "torch_threads": torch.get_num_threads()}
        print("record:", _common.write_record("rlmath", device, config, rows))


# ---- pytest: every path runs on a small case and agrees with the reference ----------------------

@pytest.mark.parametrize("impl", list(STAGES))
def test_bench_rlmath_pipeline_agrees(benchmark, impl):
    x = make_inputs(8, 33, torch.device("cpu"), seed=1)
    adv, ret = benchmark(_pipeline, STAGES[impl], x)
    m = x["mask"]
    x64 = {k: (v.double() if v.is_floating_point() else v) for k, v in x.items()}
    r64, _ = ref.shape_rewards(x64["scores"], x64["logprobs"], x64["ref_logprobs"], m, kl_coef=KL_COEF)
    a64, ret64 = ref.gae(r64, x64["values"], m, gamma=GAMMA, lam=LAM)
    w64 = ref.masked_whiten(a64, m, unbiased=impl != "openrlhf", eps=0.0 if impl == "openrlhf" else 1e-8)
    torch.testing.assert_close(torch.where(m, ret.double(), 0.0), ret64, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.where(m, adv.double(), 0.0), w64, atol=1e-4, rtol=1e-5)


def test_bench_rlmath_record(tmp_path):
    rows = run_case(4, 16, torch.device("cpu"), reps=2, loop_reps=2)
    assert {r["impl"] for r in rows} == set(STAGES) and all(r["p50_ms"] > 0 and "gbps" in r for r in rows)
    assert _common.write_record("rlmath", torch.device("cpu"), {"test": True}, rows, out_dir=tmp_path).exists()


if __name__ == "__main__":
    main()
