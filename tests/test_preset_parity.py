"""Each paper preset does what its source's code does (issue: presets that reproduce their
sources, update for update).

- One PPO update (two, to cover the lr annealing and the KL controller) of rlhf_fast's code under
  ``--preset lm_human_preferences`` equals the float64 re-derivation of openai/lm-human-preferences'
  update (``rlhf_fast.reference.lm_human_preferences``) on a tiny float64 policy, same rollout,
  same minibatch order (``rlhf_fast.trainers.parity.preset_vs_upstream``); and the comparison fails with
  either of the two old behaviours (tokens after the stop masked, lr decayed per optimizer step).
- Hand-built cases per preset: a response with a stop token mid-sequence: which tokens get a KL
  penalty, where the score lands, which tokens are in the losses; the lr of every optimizer step.
- The trainer under the preset: all sampled tokens trained, the lr held for each iteration.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_fast import algos
from rlhf_fast import config as C
from rlhf_fast.trainers import deepspeed_setup as dss
from rlhf_fast.trainers import ppo_core
from rlhf_fast.trainers.parity.preset_vs_upstream import compare_lm_human_preferences

PRESET_NAMES = ["lm_human_preferences", "tldr", "ppo_max", None]  # None: the defaults, no preset


def _ppo_cfg(preset, *overrides):
    return C.load_config(presets=[preset] if preset else [], overrides=list(overrides)).ppo


# ---- update-level parity with upstream's equations -------------------------------------------------


def test_lm_human_preferences_updates_match_upstream():
    r = compare_lm_human_preferences(updates=2, n_updates=3)
    assert r.scores_equal  # truncation at the first '.' >= min length, the -1 penalty: same scores
    # upstream: lr * (1 - update / n_updates) for every minibatch of the update (4 steps each)
    assert r.lrs_upstream == pytest.approx([1e-3] * 4 + [1e-3 * 2 / 3] * 4, rel=1e-12)
    assert r.lrs_fast == pytest.approx(r.lrs_upstream, rel=1e-12)
    for fast_beta, up_beta in r.kl_coefs:  # the adaptive controller fed the same summed KL
        assert fast_beta == pytest.approx(up_beta, rel=1e-6)
    assert r.kl_coefs[1][0] != r.kl_coefs[0][0]
    # the bound is 1e-3 of the largest update; float32 RL math on the fast side gives ~4e-6
    assert r.max_param_update > 1e-3 and r.ratio < 1e-4, r


@pytest.mark.parametrize("old", [("--ppo.generation.after_stop", "masked"),
                                 ("--ppo.lr_schedule_unit", "optimizer_step")], ids=["masked", "per_step_lr"])
def test_parity_check_sees_each_old_behaviour(old):
    r = compare_lm_human_preferences(updates=2, n_updates=3, overrides=old)
    assert r.ratio > 0.05, r


# ---- hand-built semantics per preset ----------------------------------------------------------------

STOP, PAD, R = 5, 0, 20


def _hand_case():
    """Row 0: one stop at 17. Row 1: stops at 3 and 18. Row 2: none. (B, R) = (3, 20)."""
    ids = torch.arange(R).repeat(3, 1) + 10
    ids[0, 17] = STOP
    ids[1, 3] = STOP
    ids[1, 18] = STOP
    return ids


# preset -> (train mask lengths, last trained token, truncated lengths, has_stop, where the trainer's
# score lands) for the hand case
EXPECTED = {
    # '.' counts from token 16 ("N details" #14); every sampled token trained; score on the last
    "lm_human_preferences": ([20, 20, 20], [19, 19, 19], [18, 19, 20], [True, True, False], [19, 19, 19]),
    # EOS trick: tokens after the first EOS padded and masked; the score one past the EOS
    # (summarize_from_feedback_details: sequence_lengths_p1), on the last token without room
    "tldr": ([18, 4, 20], [17, 3, 19], [18, 4, 20], [True, True, False], [18, 4, 19]),
    # the score on the EOS (MOSS-RLHF: penalized_rewards[-1] += reward)
    "ppo_max": ([18, 4, 20], [17, 3, 19], [18, 4, 20], [True, True, False], [17, 3, 19]),
    None: ([18, 4, 20], [17, 3, 19], [18, 4, 20], [True, True, False], [17, 3, 19]),
}


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_tokens_trained_and_score_position(preset):
    cfg = _ppo_cfg(preset)
    g, hp = cfg.generation, cfg.algo
    train_len, score_at, kept, has_stop, trainer_score_at = EXPECTED[preset]
    ids = _hand_case()
    post = algos.postprocess_responses(ids, torch.ones_like(ids, dtype=torch.bool), [STOP], pad_token_id=PAD,
                                       min_length=g.truncate_min_length, after_stop=g.after_stop)
    assert post.train_mask.sum(-1).tolist() == train_len
    assert post.score_index.tolist() == score_at
    assert post.score_mask.sum(-1).tolist() == kept  # the reward always scores the truncated response
    assert post.has_stop.tolist() == has_stop
    assert (post.score_ids[~post.score_mask] == PAD).all()
    assert torch.equal(post.response_ids[post.train_mask], ids[post.train_mask])

    # KL on exactly the trained tokens; the score on exactly one token, the preset's score position
    # (the trainer's experience step, ppo_core.finish_experience)
    g_ = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(3, R, generator=g_, dtype=torch.float64), -torch.rand(3, R, generator=g_, dtype=torch.float64)
    scores = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    rollout = algos.Rollout(torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.bool), post.response_ids,
                            post.train_mask, scores.float(), logprobs=lp.float(), ref_logprobs=ref.float(),
                            values=torch.zeros(3, R))
    exp = ppo_core.finish_experience(rollout, hp.replace(normalize_scores=False), kl_coef=0.1)
    rewards, kl = exp.rewards, exp.kl
    assert torch.equal(kl != 0, post.train_mask)
    score_part = rewards + 0.1 * kl
    want = torch.zeros(3, R, dtype=torch.float64)
    want[torch.arange(3), torch.tensor(trainer_score_at)] = scores
    torch.testing.assert_close(score_part.double(), want, rtol=0, atol=1e-6)  # the fused op computes in float32

    # the policy and value losses see exactly the trained tokens
    new_lp = lp.clone().requires_grad_(True)
    adv = torch.randn(3, R, generator=g_, dtype=torch.float64)
    algos.policy_loss(hp.policy_loss, new_lp, lp, adv, post.train_mask, hp.policy_loss_params()).loss.backward()
    assert torch.equal(new_lp.grad != 0, post.train_mask)
    v = torch.randn(3, R, generator=g_, dtype=torch.float64).requires_grad_(True)
    vf = algos.clipped_value_loss(v, v.detach() + 0.01, torch.randn(3, R, generator=g_, dtype=torch.float64),
                                  post.train_mask, clip_range=hp.value_clip_range, aggregation=hp.loss_aggregation)
    vf.loss.backward()
    assert torch.equal(v.grad != 0, post.train_mask)


def test_trained_needs_full_length_sampling():
    with pytest.raises(ValueError, match=r"ppo\.generation\.after_stop 'trained' .* stop_during_generation is true"):
        C.load_config(overrides=["--ppo.generation.after_stop", "trained"])
    with pytest.raises(ValueError, match=r"after_stop must be one of"):
        algos.postprocess_responses(_hand_case(), torch.ones(3, R, dtype=torch.bool), [STOP], pad_token_id=PAD,
                                    after_stop="keep")


def test_no_stop_tokens_keeps_the_generator_mask():
    ids = _hand_case()
    mask = torch.arange(R) < torch.tensor([[20], [7], [1]])  # the engine stopped rows 1 and 2
    post = algos.postprocess_responses(ids, mask, [], pad_token_id=PAD, after_stop="trained")
    assert torch.equal(post.train_mask, mask) and torch.equal(post.score_mask, mask)
    assert post.score_index.tolist() == [19, 6, 0] and post.has_stop.all()
    assert (post.response_ids[~mask] == PAD).all()


# ---- the lr of every optimizer step -------------------------------------------------------------------

# 3 iterations x 2 epochs x 2 minibatches = 12 optimizer steps, linear decay to 0 ("N details" #5)
PER_ITERATION = [1.0] * 4 + [2 / 3] * 4 + [1 / 3] * 4  # upstream: lr * (1 - update / n_updates)
PER_STEP = [1 - s / 12 for s in range(12)]
# MOSS-RLHF invsqrt_scheduler with a warm-up of round(0.1 * 12) = 1 step: max(0 / 1, 0.1), then sqrt(1 / s)
INVSQRT = [0.1] + [(1 / s) ** 0.5 for s in range(1, 12)]


@pytest.mark.parametrize("preset,factors", [("lm_human_preferences", PER_ITERATION), ("tldr", PER_ITERATION),
                                            ("ppo_max", INVSQRT), (None, PER_STEP)])
def test_lr_at_each_optimizer_step(preset, factors):
    cfg = _ppo_cfg(preset, "--ppo.iterations", "3", "--ppo.algo.num_epochs", "2", "--ppo.algo.num_minibatches", "2")
    p = torch.nn.Parameter(torch.zeros(1))
    opt = dss.make_optimizer([p], cfg.optim, offload=False)
    steps = cfg.algo.num_epochs * cfg.algo.num_minibatches
    sched = dss.make_scheduler(opt, optim=cfg.optim, sched=cfg.scheduler,
                               **dss.ppo_schedule(cfg.lr_schedule_unit, iterations=cfg.iterations,
                                                  steps_per_iteration=steps))
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
    assert seen == pytest.approx([cfg.optim.lr * f for f in factors], rel=1e-12)


def test_schedule_unit_errors_and_state_round_trip():
    with pytest.raises(ValueError, match="lr_schedule_unit"):
        dss.ppo_schedule("epoch", iterations=3, steps_per_iteration=4)
    with pytest.raises(ValueError, match="expected one of 'optimizer_step', 'iteration'"):
        C.load_config(overrides=["--ppo.lr_schedule_unit", "epoch"])
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = _ppo_cfg("lm_human_preferences")
    opt = dss.make_optimizer([p], cfg.optim, offload=False)
    sched = dss.make_scheduler(opt, optim=cfg.optim, sched=cfg.scheduler, total_steps=3, steps_per_unit=4)
    for _ in range(5):
        opt.step()
        sched.step()
    opt2 = dss.make_optimizer([p], cfg.optim, offload=False)
    other = dss.make_scheduler(opt2, optim=cfg.optim, sched=cfg.scheduler, total_steps=3, steps_per_unit=1)
    other.load_state_dict(sched.state_dict())  # a resumed run keeps the unit of its checkpoint
    assert other.steps_per_unit == 4 and other.get_last_lr() == sched.get_last_lr()


def test_fused_adamw_option():
    """optim.fused: "auto" keeps torch's per-tensor loop on a CPU (the pinned numbers), true takes the
    fused step, the same update to float32 rounding; a bad value is named."""
    assert C.load_config().ppo.optim.fused == "auto"
    cfg = C.load_config(overrides=["--ppo.optim.fused", "true", "--ppo.optim.weight_decay", "0.01"])
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(1000, generator=g)
    grads = [torch.randn(1000, generator=g) for _ in range(5)]
    final = {}
    for fused in ("auto", True):
        p = torch.nn.Parameter(w0.clone())
        opt = dss.make_optimizer([p], C.load_config(overrides=["--ppo.optim.fused", str(fused).lower(),
                                                               "--ppo.optim.weight_decay", "0.01"]).ppo.optim,
                                 offload=False)
        assert bool(opt.defaults.get("fused")) is (fused is True or torch.cuda.is_available())
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        final[fused] = p.detach().clone()
    assert not torch.equal(final["auto"], w0)
    torch.testing.assert_close(final[True], final["auto"], rtol=0, atol=1e-6 * cfg.ppo.optim.lr * 1000)
    with pytest.raises(ValueError, match="optim.fused"):
        C.load_config(overrides=["--ppo.optim.fused", "sometimes"])


# ---- the trainer under the preset ---------------------------------------------------------------------


def test_trainer_under_lm_human_preferences(tmp_path):
    """Two iterations on the built-in task: every sampled token is trained (objective/response_length
    is the sampled length), the lr is held for each iteration (lr * (1 - k / 2))."""
    from rlhf_fast.trainers.run.metrics_log import read_metrics
    from rlhf_fast.trainers.ppo import PPOTrainer

    cfg = C.load_config(presets=["lm_human_preferences"], overrides=[
        "--ppo.logging.progress_bar", "false", "--ppo.logging.tensorboard", "false", "--ppo.policy.size", "test",
        "--ppo.reward.function", "task:gold", "--ppo.iterations", "2", "--ppo.rollout_batch_size", "8",
        "--ppo.generation.max_new_tokens", "8", "--ppo.generation.truncate_min_length", "2",
        "--ppo.eval_prompts", "8", "--ppo.logging.eval_every", "0", "--ppo.algo.num_minibatches", "2",
        "--ppo.algo.num_epochs", "2", "--ppo.optim.lr", "1e-3"]).ppo
    PPOTrainer(cfg, tmp_path).fit()
    train = [r for r in read_metrics(tmp_path) if "objective/kl" in r]
    assert [r["train/lr"] for r in train] == pytest.approx([1e-3, 5e-4], rel=1e-9)
    assert all(r["objective/response_length"] == 8.0 for r in train)
    final = read_metrics(tmp_path)[-1]
    assert final["eval/response_length"] <= 8.0  # the scored (truncated) length


# ---- the critic's initial values (N+ TL;DR) ------------------------------------------------------------


def test_critic_from_reward_model_with_its_normalisation(tmp_path):
    """tldr: the critic's initial values are the reward model's normalised per-token rewards (N+
    ``ScalarModel``: head minus the reference-mean bias); without the flag, the raw head."""
    from rlhf_fast.models import Critic, RewardModel
    from rlhf_fast.tasks import tiny_config

    rm = RewardModel.from_pretrained(tiny_config("gpt2", vocab_size=40, bos_token_id=1, eos_token_id=2,
                                                 pad_token_id=0), seed=3, new_head=True)
    with torch.no_grad():
        rm.gain.fill_(1.7)
        rm.bias.fill_(-0.6)
    rm.save_pretrained(tmp_path)
    ids = torch.randint(3, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = rm.eval()(ids, mask)
    raw = Critic.from_pretrained(tmp_path).eval()(ids, mask).values
    folded = Critic.from_pretrained(tmp_path, with_normalization=True).eval()(ids, mask).values
    torch.testing.assert_close(raw, out.rewards)
    torch.testing.assert_close(folded, 1.7 * out.rewards - 0.6)
    assert _ppo_cfg("tldr").critic_with_rm_normalization
    assert not _ppo_cfg("ppo_max").critic_with_rm_normalization and not _ppo_cfg(None).critic_with_rm_normalization


def test_invsqrt_is_moss_rlhf_schedule():
    """ppo_trainer.invsqrt_scheduler with warmup 4: max(s / 4, 0.1) while s < 4, then sqrt(4 / s)."""
    got = [dss.lr_factor(s, total_steps=50, warmup_steps=4, decay="invsqrt") for s in range(7)]
    assert got == pytest.approx([0.1, 0.25, 0.5, 0.75, 1.0, (4 / 5) ** 0.5, (4 / 6) ** 0.5], rel=1e-12)
    assert dss.lr_factor(10**20, total_steps=50, warmup_steps=4, decay="invsqrt") == 1e-8


# ---- the reward model's normalisation samples (lm_human_preferences, n_details) ----------------------


def test_rm_normalisation_samples_full_length_under_lm_human_preferences(tmp_path):
    """train_reward.py normalises on ``response_length`` sampled tokens, EOS ignored; the default
    (and N+) samples end at their first EOS."""
    from rlhf_fast.trainers.rm import RMTrainer
    from rlhf_fast.trainers.sft import train_sft

    quiet = ["--sft.logging.progress_bar", "false", "--rm.logging.progress_bar", "false",
             "--sft.logging.tensorboard", "false", "--rm.logging.tensorboard", "false"]
    sft = ["--sft.model.size", "test", "--sft.model.config_overrides", "{}", "--sft.batch_size", "16",
           "--sft.micro_batch_size", "16", "--sft.data.max_train_examples", "64", "--sft.data.max_eval_examples", "16",
           "--sft.max_steps", "2", "--sft.logging.eval_every", "0"]
    train_sft(C.load_config(presets=["ci"], overrides=[*quiet, *sft]).sft, tmp_path / "sft")
    # make EOS the likely token everywhere: the final layer norm outputs a constant multiple of
    # the (tied) EOS embedding, so the EOS logit dominates
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = tmp_path / "sft" / "model"
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    with torch.no_grad():
        lm.transformer.ln_f.weight.zero_()
        lm.transformer.ln_f.bias.copy_(1000.0 * lm.lm_head.weight[eos])
    lm.save_pretrained(model_dir)
    lengths = {}
    for preset in ("lm_human_preferences", "n_details", None):
        cfg = C.load_config(presets=["ci"] + ([preset] if preset else []), overrides=[
            *quiet, "--rm.sft_model", str(tmp_path / "sft" / "model"), "--rm.normalization", "policy_samples",
            "--rm.normalization_samples", "16", "--rm.sample_max_new_tokens", "12", "--rm.eval_batch_size", "16"]).rm
        trainer = RMTrainer(cfg, tmp_path / f"rm_{preset}")
        trainer.build_datasets()
        ids, mask = trainer._policy_samples(0)
        resp, rmask = ids[:, -12:], mask[:, -12:]
        eos_inside = bool(((resp == trainer.tokenizer.eos_token_id) & rmask.bool()).any())
        lengths[preset] = (cfg.sample_stop_at_eos, rmask.sum(-1).tolist(), eos_inside)
    assert lengths["lm_human_preferences"][0] is False and lengths["n_details"][0] is False and lengths[None][0]
    assert min(lengths[None][1]) < 12  # the default stops at the EOS ...
    for preset in ("lm_human_preferences", "n_details"):  # ... these sample through it
        assert lengths[preset][1] == [12] * 16 and lengths[preset][2], lengths[preset]
