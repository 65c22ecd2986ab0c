"""Packed sequences (rlhf_fast/models/packing.py): the packed forward equals the padded one.

Every check follows docs/architecture.md "Numerical contract": the oracle is the padded forward in
float64, the baseline the padded forward in float32 (what runs without packing), the candidate the
packed float32 forward; only positions the RL math reads (valid tokens) are compared.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from rlhf_fast.algos import PRESETS, Rollout, RunningMoments
from rlhf_fast.models import Critic, Policy, RewardModel
from rlhf_fast.models.backbone import backbone_of
from rlhf_fast.models.packing import (
    PACKING_LAYOUTS,
    check_packable,
    packed_backbone,
    packing_unsupported,
    plan_packing,
    resolve_packing,
    set_packing,
)
from rlhf_fast.models.policy import run_backbone
from rlhf_fast.tasks import tiny_config
from rlhf_fast.testing import assert_no_worse_than_baseline
from rlhf_fast.trainers import ppo_core

V = 61
FAMILIES = ("llama", "gpt2", "qwen2")


def _lm(arch: str, impl: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def _batch(q_lens, r_lens, seed=0):
    """Left-padded prompts + right-padded responses, as a PPO rollout lays them out."""
    g = torch.Generator().manual_seed(seed)
    Q, R = max(q_lens), max(max(r_lens), 1)
    ids = torch.randint(3, V, (len(q_lens), Q + R), generator=g)
    ql, rl = torch.tensor(q_lens), torch.tensor(r_lens)
    mask = torch.cat([torch.arange(Q)[None] >= (Q - ql)[:, None], torch.arange(R)[None] < rl[:, None]], 1)
    return ids.masked_fill(~mask, 0), mask, Q


def _close(name, cand, orac, base, mask, atol=1e-5):
    m = mask.bool()
    assert_no_worse_than_baseline(name, cand[m].double(), orac[m].double(), base[m].double(), atol=atol)


def _alone(backbone, ids, mask):
    """The oracle: each sequence run by itself, unpadded; (B, T, H) with zeros at pads."""
    out = None
    for b in range(ids.shape[0]):
        keep = mask[b]
        if not keep.any():
            continue
        h = backbone(input_ids=ids[b, keep][None], use_cache=False).last_hidden_state[0]
        out = h.new_zeros(*ids.shape, h.shape[-1]) if out is None else out
        out[b, keep] = h
    return out


# ---- the plan ------------------------------------------------------------------------------------


def test_plan_round_trip_and_bins():
    ids, mask, _ = _batch([5, 1, 3, 2], [4, 0, 1, 3])
    plan = plan_packing(mask)
    lengths = mask.sum(-1)
    assert plan.width == int(lengths.max()) and plan.tokens == int(lengths.sum())
    assert plan.rows * plan.width < mask.numel()  # fewer slots than the padded batch
    packed = plan.pack(ids, fill=-1)
    assert torch.equal(plan.unpack(packed, fill=0), ids.masked_fill(~mask, 0))
    # each sequence keeps its tokens in order, contiguous, positions restarting at 0
    pos = plan.pack(mask.long().cumsum(-1) - 1)
    assert int((pos == 0).sum()) >= int((lengths > 0).sum())
    one = plan_packing(mask, one_stream=True)
    assert one.rows == 1 and one.width == int(lengths.sum())
    assert torch.equal(one.unpack(one.pack(ids)), ids.masked_fill(~mask, 0))


def test_plan_is_a_function_of_the_mask():
    _, mask, _ = _batch([3, 3, 1, 2, 2], [2, 2, 4, 0, 1])
    a, b = plan_packing(mask), plan_packing(mask.clone())
    assert torch.equal(a.dst, b.dst) and (a.rows, a.width) == (b.rows, b.width)


def test_pack_unpack_gradients():
    _, mask, _ = _batch([4, 2, 1], [2, 3, 0])
    plan = plan_packing(mask)
    x = torch.randn(*mask.shape, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: plan.unpack(plan.pack(t) * 2.0), (x,))


# ---- which models can pack -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", FAMILIES + ("gpt_neox",))
def test_families_can_pack(arch):
    for impl in ("sdpa", "eager"):
        assert packing_unsupported(backbone_of(_lm(arch, impl))) is None


def test_unpackable_is_a_clear_error():
    lm = _lm("llama")
    lm.config._attn_implementation = "made_up_attention"
    with pytest.raises(ValueError, match="ppo.packing.*made_up_attention.*set ppo.packing false"):
        check_packable(lm, field="ppo.packing")
    assert resolve_packing(None, lm, field="ppo.packing") is False  # the default falls back to padding
    assert resolve_packing(False, lm, field="ppo.packing") is False
    with pytest.raises(ValueError, match="sft.packing"):
        resolve_packing(True, lm, field="sft.packing")

    class NotHF(torch.nn.Module):
        config = lm.config

    NotHF.config = copy.copy(lm.config)
    NotHF.config._attn_implementation = "sdpa"
    assert "create_causal_mask" in packing_unsupported(NotHF())
    assert set(PACKING_LAYOUTS) >= {"sdpa", "eager", "flash_attention_2"}


# ---- the packed forward --------------------------------------------------------------------------

lengths = st.integers(1, 6).flatmap(
    lambda b: st.tuples(st.lists(st.integers(1, 9), min_size=b, max_size=b),
                        st.lists(st.integers(0, 7), min_size=b, max_size=b)))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", FAMILIES)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lens=lengths)
@example(lens=([1], [0]))
@example(lens=([9, 1, 1, 1], [7, 0, 0, 1]))
def test_backbone_packed_equals_padded(arch, impl, lens):
    q, r = lens
    note(f"q={q} r={r}")
    lm = _lm(arch, impl)
    ids, mask, _ = _batch(q, r)
    bb = backbone_of(lm)
    with torch.no_grad():
        base = run_backbone(bb, ids, mask)
        cand = packed_backbone(bb, ids, mask)
        orac = _alone(copy.deepcopy(bb).double(), ids, mask)
    _close("hidden", cand, orac, base, mask.unsqueeze(-1).expand_as(base))
    assert torch.all(cand[~mask] == 0)


@pytest.mark.parametrize("arch", FAMILIES)
@settings(max_examples=6, deadline=None)
@given(lens=lengths, temperature=st.sampled_from([1.0, 0.7]), linear=st.booleans())
@example(lens=([3, 1], [0, 2]), temperature=1.0, linear=False)
def test_policy_logprobs_and_grads_packed_equal_padded(arch, lens, temperature, linear):
    """Log-probs, entropy, values (b, R) and the gradients of a loss over them."""
    q, r = lens
    note(f"q={q} r={r}")
    ids, mask, Q = _batch(q, r)
    pol = Policy(_lm(arch), value_head=True, use_linear_logprobs=linear)
    torch.nn.init.normal_(pol.value_head.linear.weight, std=0.1)
    packed = copy.deepcopy(pol)
    packed.packing = True
    oracle = copy.deepcopy(pol).double()
    resp = mask[:, Q:]
    w = torch.randn(resp.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(p):
        p.zero_grad()
        out = p.logprobs(ids, mask, temperature=temperature, return_entropy=True, response_start=Q)
        loss = ((out.logprobs.double() + out.entropy.double() + out.values.double()) * w * resp).sum()
        loss.backward()
        grads = torch.cat([t.grad.double().flatten() for t in p.parameters() if t.grad is not None])
        return out, grads

    (b, gb), (c, gc), (o, go) = run(pol), run(packed), run(oracle)
    for name in ("logprobs", "entropy", "values"):
        _close(name, getattr(c, name), getattr(o, name), getattr(b, name), resp)
    assert torch.all(c.logprobs[~resp] == 0)
    assert_no_worse_than_baseline("grads", gc, go, gb, atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
@settings(max_examples=5, deadline=None)
@given(lens=lengths)
def test_reward_model_and_critic_packed_equal_padded(arch, lens):
    q, r = lens
    ids, mask, Q = _batch(q, r)
    rm = RewardModel(backbone_of(_lm(arch)), seed=3)
    prm = copy.deepcopy(rm)
    prm.packing = True
    orm = copy.deepcopy(rm).double()
    with torch.no_grad():
        b, c, o = rm(ids, mask), prm(ids, mask), orm(ids, mask)
    _close("scores", c.scores, o.scores, b.scores, torch.ones_like(b.scores, dtype=torch.bool))
    crit = Critic.from_reward_model(rm)
    pcrit = copy.deepcopy(crit)
    pcrit.packing = True
    with torch.no_grad():
        b, c = crit(ids, mask, response_start=Q), pcrit(ids, mask, response_start=Q)
        o = copy.deepcopy(crit).double()(ids, mask, response_start=Q)
    _close("critic values", c.values, o.values, b.values, mask[:, Q:])


# ---- one PPO iteration ---------------------------------------------------------------------------


def _ppo_models(arch, seed=0):
    cfg = tiny_config(arch, vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    policy = Policy.from_pretrained(cfg, seed=seed, value_head=True)
    critic = Critic(Policy.from_pretrained(cfg, seed=seed + 7).backbone)
    with torch.no_grad():  # non-zero value heads so value clipping does something
        policy.value_head.linear.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
        critic.value_head.linear.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 2))
    return policy, critic


def _rollout(q_lens, r_lens, seed):
    ids, mask, Q = _batch(q_lens, r_lens, seed)
    scores = torch.randn(len(q_lens), generator=torch.Generator().manual_seed(seed + 5))
    groups = torch.arange(len(q_lens)) // 2
    return Rollout(ids[:, :Q], mask[:, :Q], ids[:, Q:], mask[:, Q:], scores, group_ids=groups)


def _fast_iteration(policy0, critic0, rollout, hp, *, packing, kl_coef=0.05, lr=1e-2, seed=0):
    policy, critic = copy.deepcopy(policy0), copy.deepcopy(critic0) if critic0 is not None else None
    ref = copy.deepcopy(policy0).eval()
    assert set(set_packing(packing, "ppo.packing", policy, critic, ref)) == {packing}
    gen = torch.Generator().manual_seed(seed)
    plan = ppo_core.first_epoch_plan(gen, rollout.batch_size, hp, tokens=ppo_core.row_tokens(rollout))
    lp, ref_lp, values = ppo_core.score_logprobs(policy, critic, ref, rollout, hp, plan=plan)
    exp = ppo_core.finish_experience(rollout.replace(logprobs=lp, ref_logprobs=ref_lp, values=values), hp,
                                     kl_coef=kl_coef, score_stats=RunningMoments())
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)  # noqa: E731
    pst = ppo_core.TorchStepper(policy, sgd(policy), max_grad_norm=hp.max_grad_norm)
    cst = ppo_core.TorchStepper(critic, sgd(critic), max_grad_norm=hp.max_grad_norm) if critic is not None else None
    stats = ppo_core.ppo_update(pst, exp, hp, kl_coef=kl_coef, generator=gen, critic_st=cst)
    return exp, stats, (policy, critic)


def _assert_iteration_equal(padded, packed, oracle):
    """Experience (B, R), minibatch statistics and updated parameters: packed against the float64
    oracle no worse than twice the padded float32 run's error (docs/architecture.md "Numerical
    contract"); statistics / parameters are compared as vectors."""
    (ea, sa, ma), (eb, sb, mb), (eo, so, mo) = padded, packed, oracle
    m = ea.response_mask
    for name in ("logprobs", "ref_logprobs", "values", "kl", "rewards", "advantages", "returns"):
        if getattr(ea, name) is None:
            continue
        _close(name, getattr(eb, name), getattr(eo, name), getattr(ea, name), m, atol=1e-5)
    vec = lambda stats: torch.tensor([v for s in stats for v in s.to_dict().values()], dtype=torch.float64)  # noqa
    assert_no_worse_than_baseline("minibatch stats", vec(sb), vec(so), vec(sa), atol=1e-5)
    for part_a, part_b, part_o in zip(ma, mb, mo):
        if part_a is None:
            continue
        flat = lambda mod: torch.cat([p.detach().double().flatten() for p in mod.parameters()])  # noqa
        assert_no_worse_than_baseline("parameters", flat(part_b), flat(part_o), flat(part_a), atol=1e-6)


@pytest.mark.parametrize("arch,preset,separate", [("llama", "tldr", True), ("gpt2", "ppo_max", False),
                                                  ("qwen2", "tldr", False)])
def test_ppo_iteration_packed_equals_padded(arch, preset, separate):
    # micro-batches of 4 rows with one long sequence: the short ones share packed rows
    hp = PRESETS[preset].replace(num_epochs=2, num_minibatches=2, micro_batch_size=4)
    policy, critic = _ppo_models(arch)
    critic = critic if separate else None
    rollout = _rollout([7, 1, 3, 2, 6, 2, 1, 2], [6, 1, 3, 0, 6, 2, 2, 1], seed=1)
    padded = _fast_iteration(policy, critic, rollout, hp, packing=False)
    packed = _fast_iteration(policy, critic, rollout, hp, packing=True)
    d = lambda m: copy.deepcopy(m).double() if m is not None else None  # noqa: E731
    oracle = _fast_iteration(d(policy), d(critic), rollout.map(lambda t: t.double() if t.is_floating_point() else t),
                             hp, packing=False)
    _assert_iteration_equal(padded, packed, oracle)
    first = packed[1][0]  # exactness promise: the first minibatch's ratio is exactly 1
    assert first.ratio_mean.item() == 1.0 and first.ratio_max.item() == 1.0 and first.approxkl.item() == 0.0


def test_ppo_iteration_grpo_packed_equals_padded():
    hp = PRESETS["tldr"].replace(advantage_estimator="grpo", num_epochs=1, num_minibatches=1, micro_batch_size=None)
    policy, _ = _ppo_models("llama", seed=3)
    rollout = _rollout([2, 2, 7, 7, 1, 1], [3, 0, 5, 5, 2, 1], seed=2)
    padded = _fast_iteration(policy, None, rollout, hp, packing=False)
    packed = _fast_iteration(policy, None, rollout, hp, packing=True)
    oracle = _fast_iteration(copy.deepcopy(policy).double(), None,
                             rollout.map(lambda t: t.double() if t.is_floating_point() else t), hp, packing=False)
    _assert_iteration_equal(padded, packed, oracle)


# ---- SFT and reward-model steps ------------------------------------------------------------------


class _Engine(torch.nn.Module):
    """What the stage trainers call: the module, run as ``engine(...)``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _stage_step(trainer_cls, model, batch, *, packing, **cfg):
    """``trainer_cls.micro_step`` on ``model`` (no DeepSpeed): loss, statistics, gradients."""
    import types

    fake = types.SimpleNamespace(engine=_Engine(model), packing=packing, cfg=types.SimpleNamespace(**cfg))
    fake._logits_and_targets = types.MethodType(getattr(trainer_cls, "_logits_and_targets", lambda s, b: None), fake)
    model.zero_grad()
    loss, stats = trainer_cls.micro_step(fake, batch)
    loss.backward()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    return loss.detach().double().reshape(1), stats, grads


@pytest.mark.parametrize("arch", FAMILIES)
@settings(max_examples=4, deadline=None)
@given(lens=lengths, loss_on_prompt=st.booleans())
def test_sft_step_packed_equals_padded(arch, lens, loss_on_prompt):
    from rlhf_fast.trainers.sft import SFTTrainer

    q, r = lens
    ids, mask, Q = _batch(q, r)
    labels = ids.masked_fill(~mask, -100)
    if not loss_on_prompt:
        labels[:, :Q] = -100
    batch = dict(input_ids=ids, attention_mask=mask.long(), labels=labels,
                 position_ids=(mask.long().cumsum(-1) - mask.long()).clamp(min=0))
    lm = _lm(arch)
    pad = _stage_step(SFTTrainer, lm, batch, packing=False)
    packed = _stage_step(SFTTrainer, copy.deepcopy(lm), batch, packing=True)
    orac = _stage_step(SFTTrainer, copy.deepcopy(lm).double(), batch, packing=False)
    assert packed[1]["targets"] == pad[1]["targets"] and packed[1]["tokens"] == pad[1]["tokens"]
    assert_no_worse_than_baseline("sft loss", packed[0], orac[0], pad[0], atol=1e-5)
    assert_no_worse_than_baseline("sft grads", packed[2], orac[2], pad[2], atol=1e-6)


@pytest.mark.parametrize("arch", FAMILIES)
@settings(max_examples=4, deadline=None)
@given(lens=lengths)
def test_rm_step_packed_equals_padded(arch, lens):
    from rlhf_fast.trainers.rm import RMTrainer

    q, r = lens
    if len(q) % 2:  # chosen rows then rejected rows
        q, r = q + q[:1], r + r[:1]
    ids, mask, _ = _batch(q, r)
    batch = dict(input_ids=ids, attention_mask=mask.long(), num_pairs=len(q) // 2,
                 position_ids=(mask.long().cumsum(-1) - mask.long()).clamp(min=0))
    rm = RewardModel(backbone_of(_lm(arch)), seed=3)
    cfg = dict(normalize_before=False, margin=0.0)
    pad = _stage_step(RMTrainer, rm, batch, packing=False, **cfg)
    prm = copy.deepcopy(rm)
    prm.packing = True
    packed = _stage_step(RMTrainer, prm, batch, packing=True, **cfg)
    orac = _stage_step(RMTrainer, copy.deepcopy(rm).double(), batch, packing=False, **cfg)
    for k in ("loss_sum", "chosen_sum", "rejected_sum"):
        assert_no_worse_than_baseline(k, torch.tensor([packed[1][k]]), torch.tensor([orac[1][k]]),
                                      torch.tensor([pad[1][k]]), atol=1e-5)
    assert packed[1]["correct"] == pad[1]["correct"] or abs(packed[1]["chosen_sum"] - packed[1]["rejected_sum"]) < 1e-5
    assert_no_worse_than_baseline("rm loss", packed[0], orac[0], pad[0], atol=1e-5)
    assert_no_worse_than_baseline("rm grads", packed[2], orac[2], pad[2], atol=1e-6)


# ---- micro-batches by token budget ---------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(1, 40), min_size=4, max_size=24), budget=st.integers(1, 80),
       world=st.sampled_from([1, 2, 4]))
def test_token_budget_plan(tokens, budget, world):
    from rlhf_fast.trainers.token_budget import token_budget_micro

    mb = len(tokens) - len(tokens) % world
    rows = torch.randperm(mb, generator=torch.Generator().manual_seed(len(tokens)))
    plans = [token_budget_micro(rows, tokens, budget, r, world) for r in range(world)]
    assert len({len(p) for p in plans}) == 1  # every rank runs the same number of micro-batches
    for r, plan in enumerate(plans):
        pos = torch.cat(plan).tolist()
        assert pos == list(range(r, mb, world))  # this rank's rows, in order, each once
    if world == 1:  # alone, every micro-batch fits the budget or is one row
        for chunk in plans[0]:
            assert len(chunk) == 1 or sum(tokens[rows[i]] for i in chunk.tolist()) <= budget


def test_ppo_iteration_token_budget_equals_rows():
    """Micro-batches by tokens change neither the losses nor the update (the minibatch normaliser)."""
    hp = PRESETS["tldr"].replace(num_epochs=2, num_minibatches=2, micro_batch_size=None)
    policy, critic = _ppo_models("llama")
    rollout = _rollout([7, 1, 3, 2, 6, 2, 1, 2], [6, 1, 3, 0, 6, 2, 2, 1], seed=1)
    rows = _fast_iteration(policy, critic, rollout, hp, packing=False)
    by_tokens = _fast_iteration(policy, critic, rollout, hp.replace(max_tokens_per_micro_batch=9), packing=True)
    d = lambda m: copy.deepcopy(m).double()  # noqa: E731
    oracle = _fast_iteration(d(policy), d(critic), rollout.map(lambda t: t.double() if t.is_floating_point() else t),
                             hp, packing=False)
    _assert_iteration_equal(rows, by_tokens, oracle)
    first = by_tokens[1][0]
    assert first.ratio_mean.item() == 1.0 and first.approxkl.item() == 0.0


def test_a_mask_with_a_hole_runs_padded():
    """The token after a hole is predicted from the hole's state in the padded layout: such a
    batch is not packed (plan None) and the packed models give the padded outputs exactly."""
    ids, mask, Q = _batch([3, 2], [4, 3])
    mask[0, Q + 1] = False
    assert plan_packing(mask) is None
    pol = Policy(_lm("llama"), value_head=True)
    packed = copy.deepcopy(pol)
    packed.packing = True
    with torch.no_grad():
        a = pol.logprobs(ids, mask, response_start=Q, return_entropy=True)
        b = packed.logprobs(ids, mask, response_start=Q, return_entropy=True)
    resp = mask[:, Q:]
    assert torch.equal(a.logprobs[resp], b.logprobs[resp]) and torch.equal(a.values, b.values)



def test_default_packing_falls_back_to_padded_loudly():
    """``packing: null`` packs where the model can; where it cannot, the padded fallback is a
    warning naming the field and the reason, never silent (``true`` is an error)."""
    import types

    from rlhf_fast.models.packing import resolve_packing

    model = torch.nn.Linear(2, 2)
    model.config = types.SimpleNamespace(_attn_implementation="not_a_packing_impl")
    with pytest.warns(RuntimeWarning, match=r"ppo\.packing: running padded.*not_a_packing_impl"):
        assert resolve_packing(None, model, field="ppo.packing") is False
    with pytest.raises(ValueError, match=r"ppo\.packing"):
        resolve_packing(True, model, field="ppo.packing")
    assert resolve_packing(False, model, field="ppo.packing") is False
