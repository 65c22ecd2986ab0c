"""bf16 / fp16 training forwards on the CPU (``rlhf_fast/models/packing.py``, ``attention_context``):
short attention runs sdpa's math backend (the flash kernel's reduced-precision backward is slow on
the CPU), the result stays within the numerical contract of docs/architecture.md against float64,
with the flash backend as the baseline, and the first PPO minibatch's ratio stays exactly 1."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from rlhf_fast.algos import PRESETS, Rollout, RunningMoments
from rlhf_fast.models import Critic, Policy, packing
from rlhf_fast.tasks import tiny_config
from rlhf_fast.testing import assert_no_worse_than_baseline
from rlhf_fast.trainers import ppo_core

V, Q, R = 61, 5, 12
FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def _policy(dtype, attn="sdpa"):
    cfg = tiny_config("llama", vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Policy.from_pretrained(cfg, seed=0, dtype=dtype, attn_implementation=attn)


def _rollout(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(3, V, (B, Q), generator=g)
    qm = torch.arange(Q) >= torch.randint(0, Q - 1, (B,), generator=g)[:, None]
    q[~qm] = 0
    r = torch.randint(3, V, (B, R), generator=g)
    rm = torch.arange(R) < torch.randint(1, R + 1, (B,), generator=g)[:, None]
    r[~rm] = 0
    return Rollout(q, qm, r, rm, torch.randn(B, generator=g))


def _flash_state():
    return torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()


@pytest.mark.parametrize("dtype,attn,width,math_only", [
    (torch.bfloat16, "sdpa", 24, True), (torch.float16, "sdpa", packing.CPU_REDUCED_SDPA_MATH_MAX_WIDTH, True),
    (torch.bfloat16, "sdpa", packing.CPU_REDUCED_SDPA_MATH_MAX_WIDTH + 1, False),
    (torch.float32, "sdpa", 24, False), (torch.bfloat16, "eager", 24, False)])
def test_attention_context_choice(dtype, attn, width, math_only):
    backbone = _policy(dtype, attn).backbone
    before = _flash_state()
    with packing.attention_context(backbone, width):
        inside = _flash_state()
    assert _flash_state() == before  # restored
    assert inside == ((False, True) if math_only else before)


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_forward_runs_math_attention_and_float32_flash(packed):
    """The wiring: run_backbone (padded) and packed_backbone take the context."""
    batch = _rollout(4)
    for dtype, flash_expected in ((torch.bfloat16, False), (torch.float32, True)):
        policy = _policy(dtype)
        policy.packing = packed
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            policy.logprobs(batch.sequences, batch.attention_mask, response_start=batch.response_start)
        names = {e.key for e in prof.key_averages()}
        assert (FLASH in names) == flash_expected, (dtype, sorted(n for n in names if "attention" in n))


@pytest.mark.parametrize("packed", [False, True])
def test_sft_bf16_forward_runs_math_attention(packed):
    """SFT calls its engine's causal LM directly (trainers/sft.py): the same context applies."""
    from rlhf_fast.models.heads import position_ids_from_mask
    from rlhf_fast.trainers.sft import SFTTrainer

    batch = _rollout(4)
    ids, mask = batch.sequences, batch.attention_mask
    for dtype, flash_expected in ((torch.bfloat16, False), (torch.float32, True)):
        lm = _policy(dtype).model

        class Engine:
            module = lm

            def __call__(self, **kw):
                return lm(**kw)

        fake = type("T", (), {"engine": Engine(), "packing": packed})()
        inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(~mask.bool(), -100),
                      position_ids=position_ids_from_mask(mask))
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            logits, _ = SFTTrainer._logits_and_targets(fake, inputs)
        assert torch.isfinite(logits.float()).all()
        assert (FLASH in {e.key for e in prof.key_averages()}) == flash_expected, dtype


def _logprobs_and_grads(policy, batch):
    out = policy.logprobs(batch.sequences, batch.attention_mask, response_start=batch.response_start)
    m = batch.response_mask
    (out.logprobs.float() * m).sum().backward()
    grads = torch.cat([p.grad.double().flatten() for p in policy.parameters()])
    return out.logprobs.detach().double()[m], grads


@pytest.mark.parametrize("packed", [False, True])
def test_bf16_math_attention_within_the_contract(packed, monkeypatch):
    """bf16 log-probs and parameter gradients with the math backend, against the float64 model
    (oracle): no worse than twice the error of bf16 with the flash backend (PyTorch's own choice)."""
    batch = _rollout(6)
    base = _policy(torch.float32)
    models = {}
    for name, dtype in (("oracle", torch.float64), ("candidate", torch.bfloat16), ("baseline", torch.bfloat16)):
        p = copy.deepcopy(base).to(dtype)
        p.packing = packed
        models[name] = p
    orac = _logprobs_and_grads(models["oracle"], batch)
    cand = _logprobs_and_grads(models["candidate"], batch)
    monkeypatch.setattr(packing, "CPU_REDUCED_SDPA_MATH_MAX_WIDTH", 0)  # flash for the baseline
    base_out = _logprobs_and_grads(models["baseline"], batch)
    assert not torch.equal(cand[1], base_out[1])  # two different kernels ran
    assert_no_worse_than_baseline("bf16 log-probs", cand[0], orac[0], base_out[0], atol=1e-2)
    assert_no_worse_than_baseline("bf16 gradients", cand[1], orac[1], base_out[1], atol=1e-2)


def test_bf16_ppo_update_first_ratio_exactly_one():
    """A bf16 policy and critic (what ppo.deepspeed.dtype bf16 trains), packed, trimmed: the
    experience forwards and the first minibatch's update forwards take the same attention path."""
    policy = _policy(torch.bfloat16)
    critic = Critic(copy.deepcopy(policy.backbone)).to(torch.bfloat16)
    ref = copy.deepcopy(policy).eval()
    for m in (policy, critic, ref):
        m.packing = True
    batch = _rollout(8)
    hp = PRESETS["tldr"].replace(temperature=0.7, num_epochs=2, num_minibatches=2, micro_batch_size=2)
    gen = torch.Generator().manual_seed(0)
    plan = ppo_core.first_epoch_plan(gen, batch.batch_size, hp)
    lp, ref_lp, values = ppo_core.score_logprobs(policy, critic, ref, batch, hp, plan=plan)
    exp = ppo_core.finish_experience(batch.replace(logprobs=lp, ref_logprobs=ref_lp, values=values), hp,
                                     kl_coef=0.05, score_stats=RunningMoments())
    steppers = [ppo_core.TorchStepper(m, torch.optim.Adam(m.parameters(), lr=1e-2)) for m in (policy, critic)]
    stats = ppo_core.ppo_update(steppers[0], exp, hp, kl_coef=0.05, generator=gen, critic_st=steppers[1])
    first = stats[0]
    assert float(first.ratio_mean) == 1.0 and float(first.ratio_max) == 1.0 and float(first.approxkl) == 0.0
    assert float(stats[-1].approxkl) != 0.0
    assert all(torch.isfinite(s.loss) for s in stats)


@pytest.mark.parametrize("dtype,fast,warns", [("bf16", False, True), ("fp16", False, True), ("bf16", True, False),
                                              ("fp32", False, False)])
def test_reduced_precision_without_native_cpu_matmul_warns(dtype, fast, warns, monkeypatch, recwarn):
    import warnings

    from rlhf_fast.config import BatchPlan, DeepSpeedConfig
    from rlhf_fast.trainers import deepspeed_setup as dss

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dss, "cpu_has_fast_matmul", lambda name: fast or name == "fp32")
    warnings.simplefilter("always")
    cfg = dss.deepspeed_config_dict(DeepSpeedConfig(dtype=dtype), BatchPlan(4, 2, 2, 1))
    assert (dtype in cfg) == (dtype != "fp32")
    msgs = [str(w.message) for w in recwarn.list if "matrix multiply" in str(w.message)]
    assert bool(msgs) == warns, msgs
    if warns:
        assert f"deepspeed.dtype {dtype}" in msgs[0] and "fp32" in msgs[0]


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX"), reason="x86 only")
def test_cpu_without_avx512_bf16_is_detected():
    """The probe follows oneDNN's ISA: held at AVX2, bf16 is not native (as on a Zen 3 / AVX2 CPU)."""
    import subprocess
    import sys

    code = "from rlhf_fast.trainers.deepspeed_setup import cpu_has_fast_matmul as f; print(f('bf16'), f('fp32'))"
    env = {**__import__("os").environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "True"]
