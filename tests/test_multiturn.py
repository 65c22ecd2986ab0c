"""Multi-turn episodes (docs/architecture.md, "Multi-turn episodes"): the engine's episode layout
equals the transcript the environments saw (token in, token out), the KV cache continues across
turns (one prefill, one forward per token), the engine's log-probs of every model token of every
turn are the trainer's, the first minibatch's ratio is exactly 1, environment tokens get zero
gradient, and the multi-turn rewards / advantages equal their float64 reference (hypothesis)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import example, given, note, settings
from hypothesis import strategies as st

from rlhf_fast import algos, reference
from rlhf_fast.algos import Rollout
from rlhf_fast.engine import HybridEngine, SamplingParams
from rlhf_fast.envs import ENVIRONMENTS, StepResult, Turn, load_environment
from rlhf_fast.trainers import ppo_core

V, PAD, EOS = 48, 0, 2
STOP = tuple(range(3, 19))  # a third of the vocabulary ends a turn: turns are short at temperature 1


class ScriptedEnv:
    """Answers turn k with ids (20 + k, 21 + k)[: 1 + k % 2] and reward 0.5 * k; done after
    ``turns`` turns. Keeps every turn it saw and every observation it returned."""

    def __init__(self, turns=3, text_obs=False):
        self.turns, self.text_obs, self.seen, self.sent = turns, text_obs, [], []

    def reset(self, prompt):
        self.seen, self.sent = [], []
        self.sent.append([30, 31])
        return [30, 31]  # an opening observation: environment tokens before the first model turn

    def step(self, turn: Turn):
        k = len(self.seen)
        self.seen.append(list(turn.ids))
        obs = [20 + k, 21 + k][: 1 + k % 2]
        self.sent.append(obs)
        return StepResult(obs, 0.5 * k, k + 1 >= self.turns)


def _policy(seed=0):
    from rlhf_fast.models import Policy
    from rlhf_fast.tasks import tiny_config

    cfg = tiny_config("llama", vocab_size=V, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD, size="test")
    policy = Policy.from_pretrained(cfg, seed=seed, value_head=True)
    with torch.no_grad():
        policy.value_head.linear.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    return policy


def _prompts(B=5, P=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(19, V, (B, P), generator=g)
    lengths = torch.randint(2, P + 1, (B,), generator=g)
    lengths[0] = P
    mask = torch.arange(P)[None, :] >= (P - lengths)[:, None]
    return ids.masked_fill(~mask, PAD), mask.long()


def _episodes(policy, envs, R=64, max_turns=8, B=5, seed=7, max_batch_size=8):
    ids, mask = _prompts(B)
    eng = HybridEngine(policy, pad_token_id=PAD, max_batch_size=max_batch_size, max_seq_len=ids.shape[1] + R)
    params = SamplingParams(max_new_tokens=R, eos_token_id=EOS, stop_token_ids=STOP, seed=seed)
    out = eng.run_episodes(ids, mask, params, envs=envs, prompts=["p"] * B, encode=lambda s: [int(c) for c in s.split()],
                           decode=lambda t: " ".join(map(str, t)), max_turns=max_turns)
    return eng, ids, mask, out


def _transcript(env: ScriptedEnv):
    segs = [("env", env.sent[0])]
    for turn, obs in zip(env.seen, env.sent[1:]):
        segs += [("model", turn), ("env", obs)]
    return segs


def test_token_in_token_out_and_kv_continuation():
    """The episode tensors are the transcript the environments saw and answered, concatenated (the
    reference builds it), cut at nothing: every episode ends by ``done``; one prefill forward, then
    one forward per episode token (the cache continues across turns: no history re-run)."""
    envs = [ScriptedEnv(turns=3) for _ in range(5)]
    eng, ids, _, out = _episodes(_policy(), envs)
    assert out.done.all() and out.has_stop.all()
    # the last turn ("done") is answered too; the reference cuts at the engine's width like the engine
    R = out.response_mask.shape[1]
    want_ids, want_resp, want_action = reference.episode_layout([_transcript(e)[:-1] for e in envs], R, PAD)
    assert torch.equal(out.responses, want_ids)
    assert torch.equal(out.response_mask, want_resp) and torch.equal(out.action_mask, want_action)
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert eng.stats.prefill_rows == 5 and eng.stats.forwards == R  # 1 prefill + (R - 1) decode steps
    # the reward of each step but the last at its turn's last model token; the last is the final reward
    for i, e in enumerate(envs):
        ends = [s["end"] - 1 for s in out.turns[i] if s["role"] == "model"]
        assert out.turn_rewards[i, ends].tolist() == [0.0, 0.5, 0.0][: len(ends) - 1] + [0.0]
        assert float(out.final_reward[i]) == 1.0
        assert out.turn_rewards[i].count_nonzero() == 1


def test_chunks_budget_and_turn_limit():
    """max_batch_size 2 (three chunks) gives the same tokens; a budget of 6 tokens cuts every episode (3 turns need at least 8)
    (not done); max_turns 1 ends after the first answered turn."""
    policy = _policy()
    _, _, _, whole = _episodes(policy, [ScriptedEnv() for _ in range(5)])
    _, _, _, chunked = _episodes(policy, [ScriptedEnv() for _ in range(5)], max_batch_size=2)
    assert torch.equal(whole.sequences, chunked.sequences)  # same draws: a row's uniforms follow its index in the call
    assert float((whole.logprobs - chunked.logprobs).abs().max()) <= 1e-5  # GEMMs block by the row count
    _, _, _, cut = _episodes(policy, [ScriptedEnv() for _ in range(5)], R=6)
    assert cut.response_mask.shape[1] == 6 and not cut.done.any() and cut.response_mask.all()
    envs = [ScriptedEnv(turns=5) for _ in range(5)]
    _, _, _, one = _episodes(policy, envs, max_turns=1)
    assert all(len(e.seen) == 1 for e in envs) and not one.done.any()
    assert all([s["role"] for s in t] == ["env", "model"] for t in one.turns)


def test_engine_logprobs_are_the_trainers_on_every_turn():
    """Every model token of every turn: |engine - trainer| <= 1e-5 (float32 rounding), the trainer
    forwarding the engine's ids as they are, environment tokens attended."""
    policy = _policy()
    _, ids, mask, out = _episodes(policy, [ScriptedEnv(turns=4) for _ in range(5)], R=80)
    seq = out.sequences
    att = torch.cat([mask.bool(), out.response_mask], 1)
    with torch.no_grad():
        lp = policy.logprobs(seq, att, response_start=ids.shape[1]).logprobs  # (B, R)
    m = out.action_mask
    assert int(m.sum()) > 40 and int((out.response_mask & ~m).sum()) > 20
    assert float((lp - out.logprobs).abs()[m].max()) <= 1e-5
    assert (out.logprobs[~m] == 0).all()


def _rollout_from(out, ids, mask, scores=None):
    return Rollout(ids, mask.bool(), out.responses, out.response_mask,
                   out.final_reward if scores is None else scores, action_mask=out.action_mask,
                   turn_rewards=out.turn_rewards)


def _iteration(policy, rollout, hp, *, grads=None, kl_coef=0.1):
    ref = copy.deepcopy(policy).eval()
    gen = torch.Generator().manual_seed(0)
    plan = ppo_core.first_epoch_plan(gen, rollout.batch_size, hp)
    lp, ref_lp, values = ppo_core.score_logprobs(policy, None, ref, rollout, hp, plan=plan)
    exp = ppo_core.finish_experience(rollout.replace(logprobs=lp, ref_logprobs=ref_lp, values=values), hp,
                                     kl_coef=kl_coef, score_stats=algos.RunningMoments())
    st_ = ppo_core.TorchStepper(policy, torch.optim.Adam(policy.parameters(), lr=1e-3))
    return exp, ppo_core.ppo_update(st_, exp, hp, kl_coef=kl_coef, generator=gen)


def test_first_minibatch_ratio_exactly_one_on_episodes():
    policy = _policy()
    _, ids, mask, out = _episodes(policy, [ScriptedEnv(turns=3) for _ in range(4)], B=4)
    hp = algos.PRESETS["tldr"].replace(num_minibatches=2, micro_batch_size=1, num_epochs=2)
    exp, stats = _iteration(policy, _rollout_from(out, ids, mask), hp)
    s = stats[0]
    assert float(s.ratio_mean) == 1.0 and float(s.ratio_max) == 1.0 and float(s.approxkl) == 0.0
    assert float(s.clipfrac) == 0.0
    env = out.response_mask & ~out.action_mask
    for t in (exp.advantages, exp.returns, exp.rewards, exp.kl):
        assert (t[env] == 0).all()


def test_environment_tokens_get_zero_gradient(monkeypatch):
    """The gradient of the whole PPO loss (clipped policy loss, KL in the loss, entropy bonus,
    value loss) w.r.t. the log-probs, entropies and values of environment tokens is exactly 0; the
    model's tokens get gradient."""
    policy = _policy()
    _, ids, mask, out = _episodes(policy, [ScriptedEnv(turns=3) for _ in range(4)], B=4)
    hp = algos.PRESETS["tldr"].replace(num_minibatches=1, num_epochs=1, kl_placement="in_loss", ent_coef=0.01)
    kept = []
    real = ppo_core.policy_forward

    def spy(policy_, critic, batch, hp_, *, entropy=False):
        res = real(policy_, critic, batch, hp_, entropy=entropy)
        if torch.is_grad_enabled():
            for t in res:
                if t is not None and t.requires_grad:
                    t.retain_grad()
            kept.append((batch, res))
        return res

    monkeypatch.setattr(ppo_core, "policy_forward", spy)
    _iteration(policy, _rollout_from(out, ids, mask), hp)
    assert kept
    for batch, res in kept:
        env = batch.response_mask & ~batch.action_mask
        for t in res:
            assert t.grad is not None
            assert (t.grad[env] == 0).all()
            assert (t.grad[batch.action_mask] != 0).any()


# ---- the multi-turn rewards and advantages against their float64 reference -------------------------


@st.composite
def _case(draw):
    B, R = draw(st.integers(1, 5)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    length = torch.randint(1, R + 1, (B,), generator=g)
    resp = torch.arange(R)[None, :] < length[:, None]
    action = resp & (torch.rand(B, R, generator=g) < draw(st.sampled_from([0.3, 0.7, 1.0])))
    whiten = draw(st.booleans())
    gamma, lam = draw(st.sampled_from([1.0, 0.9])), draw(st.sampled_from([0.95, 1.0, 0.5]))
    note(f"B={B} R={R} seed={seed} whiten={whiten} gamma={gamma} lam={lam}")
    return B, R, seed, resp, action, whiten, gamma, lam


@settings(max_examples=60, deadline=None)
@given(_case())
@example((2, 5, 0, torch.ones(2, 5, dtype=torch.bool),
          torch.tensor([[True, False, False, True, True], [False, False, False, False, False]]), False, 1.0, 0.95))
def test_multiturn_advantages_equal_reference(case):
    B, R, seed, resp, action, whiten, gamma, lam = case
    g = torch.Generator().manual_seed(seed + 1)
    lp, ref_lp, values = (torch.randn(B, R, generator=g) for _ in range(3))
    turn = torch.where(torch.rand(B, R, generator=g) < 0.3, torch.randn(B, R, generator=g), 0.0)
    scores = torch.randn(B, generator=g)
    ids = torch.zeros(B, R, dtype=torch.long)
    roll = Rollout(torch.ones(B, 2, dtype=torch.long), torch.ones(B, 2, dtype=torch.bool), ids, resp, scores,
                   logprobs=lp, ref_logprobs=ref_lp, values=values, action_mask=action, turn_rewards=turn)
    hp = algos.PRESETS["tldr"].replace(gamma=gamma, lam=lam, whiten_advantages=whiten, whiten_rewards=False)
    exp = ppo_core.finish_experience(roll, hp, kl_coef=0.1, score_stats=algos.RunningMoments())
    d = lambda t: t.double()  # noqa: E731
    rw, adv, ret = reference.multiturn_advantages(d(scores), d(turn), d(lp), d(ref_lp), d(values), action, kl_coef=0.1,
                                                  gamma=gamma, lam=lam)
    if whiten:
        adv = reference.masked_whiten(adv, action, shift_mean=True, unbiased=hp.advantage_params().unbiased,
                                      eps=hp.advantage_params().eps)
    tol = 1e-5 * (1 + float(torch.cat([rw.abs().flatten(), adv.abs().flatten(), ret.abs().flatten()]).max()))
    assert float((exp.rewards.double() - rw).abs().max()) <= tol
    assert float((exp.advantages.double() - adv).abs().max()) <= tol
    assert float((exp.returns.double() - ret).abs().max()) <= tol


# ---- the protocol: errors name the problem -----------------------------------------------------------


def test_bad_environments_are_named():
    policy = _policy()

    class BadReward(ScriptedEnv):
        def step(self, turn):
            return (None, float("nan"), True)

    class BadObs(ScriptedEnv):
        def step(self, turn):
            return ([V + 5], 0.0, False)

    with pytest.raises(ValueError, match=r"row \d: step 0: reward must be a finite number"):
        _episodes(policy, [BadReward() for _ in range(5)])
    with pytest.raises(ValueError, match=rf"row \d: step 0: observation token {V + 5}"):
        _episodes(policy, [BadObs() for _ in range(5)])
    with pytest.raises(ValueError, match="5 prompts need 5 environments"):
        _episodes(policy, [ScriptedEnv()])
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_environment("no_such_module_xyz:Env")
    with pytest.raises(ValueError, match="unknown environment 'nope'.*tiny_calculator"):
        load_environment("nope")
    assert load_environment("tiny_calculator") is ENVIRONMENTS["tiny_calculator"]
    assert load_environment("test_multiturn:ScriptedEnv") is ScriptedEnv


def test_chat_template_observations_render_the_conversation():
    """An observation rendered with ``data.chat.render_observation`` makes the episode text (prompt,
    model turns as sampled, observations) equal transformers' ``apply_chat_template`` of the whole
    conversation with the generation prompt, turn after turn; a template that renders the episode
    differently is refused."""
    from rlhf_fast.data.chat import render_observation

    from test_chat_data import _tokenizer

    tok = _tokenizer()
    conv = [{"role": "user", "content": "how is the cat"}]
    produced = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    for turn, obs in [("<calc>1+2</calc>", "3"), ("<calc>3*4</calc>", "12")]:
        produced += turn + "<|im_end|>"  # the model's turn, ended by its end-of-turn (EOS) token
        conv.append({"role": "assistant", "content": turn})
        produced += render_observation(tok, conv, produced, obs)
        conv.append({"role": "tool", "content": obs})
        assert produced == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert produced.endswith("<|im_start|>tool\n12<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="renders the conversation"):
        render_observation(tok, conv, produced + "x", "5")
    with pytest.raises(ValueError, match="no chat template"):
        render_observation(_tokenizer(None), conv, produced, "5")
