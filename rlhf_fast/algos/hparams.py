"""PPO-math hyper-parameters, shared by the reference PPO and the fast trainer, with presets for
each seed. Each field's docstring names where its default comes from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from rlhf_fast._rlmath_checks import KL_ESTIMATORS
from rlhf_fast.algos import critic_free  # noqa: F401  (registers dr_grpo, reinforce_pp*, gspo, seq-mean-token-sum-norm)
from rlhf_fast.algos.advantages import ESTIMATORS, AdvantageEstimator, AdvantageParams
from rlhf_fast.algos.kl import KL_PLACEMENTS, KLPlacement
from rlhf_fast.algos.kl_control import KL_CONTROLLERS, make_kl_controller
from rlhf_fast.algos.losses import AGGREGATIONS, POLICY_LOSSES, Aggregation, PolicyLossParams
from rlhf_fast.algos.truncation import SCORE_POSITIONS, ScorePosition


@dataclass
class PPOHyperParams:
    """The PPO math of one iteration (not generation, optimiser or schedule settings).

    Mutable so that ``rlhf_fast.config`` can set fields from YAML and the command line; the config
    layer re-runs ``validate()`` after every change (``__post_init__`` runs it at construction)."""

    # -- advantages --
    gamma: float = 1.0
    """discount ("N details" #15; TRL, verl, OpenRLHF, DeepSpeed-Chat all use 1)."""
    lam: float = 0.95
    """GAE lambda ("N details" #15; N+ TL;DR; DeepSpeed-Chat; verl / OpenRLHF default 1)."""
    advantage_estimator: str = "gae"
    """registered estimator: "gae" (PPO), "grpo", "rloo" (``rlhf_fast.algos.advantages``)."""
    whiten_rewards: bool = False
    """whiten token rewards without shifting the mean before GAE ("N details" #18: on in
    lm-human-preferences; off in N+ TL;DR and TRL)."""
    whiten_advantages: bool = True
    """whiten advantages with the mean shift ("N details" #18; N+ TL;DR; TRL; PPO-max)."""
    whiten_unbiased: bool = False
    """variance with n - 1 (torch.var, TRL) instead of n (TF ``tf.nn.moments``, the N-details and
    N+ code; "N details" #18)."""
    whiten_eps: float = 1e-8
    """added to the variance in whitening (the N-details code, TRL)."""
    advantages_per_minibatch: bool = False
    """compute rewards whitening, GAE and advantage whitening per minibatch inside the update
    (lm-human-preferences ``loss()``; "N details" #18 "per-minibatch whitening") instead of once
    per batch (TRL, N+ TL;DR)."""

    # -- KL --
    kl_estimator: str = "k1"
    """per-token KL estimator k1 / k2 / k3 ("N details" #17 and N+ TL;DR: k1)."""
    kl_placement: str = "in_reward"
    """"in_reward" (Ziegler et al.; TRL; N+) or "in_loss" (GRPO; verl ``use_kl_loss``)."""
    kl_clamp: Optional[float] = None
    """clamp of the per-token KL estimate (verl / OpenRLHF clamp at 10; TRL and N-details: none)."""
    kl_controller: str = "fixed"
    """"fixed" (N+ TL;DR, PPO-max) or "adaptive" (lm-human-preferences; "N details" #20)."""
    kl_init: float = 0.05
    """initial beta (N+ TL;DR 0.05; lm-human-preferences 0.15; PPO-max 0.01)."""
    kl_target: float = 6.0
    """adaptive controller's target KL in nats per sequence ("N details" #20)."""
    kl_horizon: float = 10000.0
    """adaptive controller's horizon in episodes ("N details" #20)."""

    # -- losses --
    policy_loss: str = "ppo_clip"
    """registered policy loss (``rlhf_fast.algos.losses.POLICY_LOSSES``)."""
    clip_range: float = 0.2
    """policy ratio clip epsilon, lower side ("N details" #19; N+; PPO-max)."""
    clip_range_high: Optional[float] = None
    """upper-side epsilon; None = clip_range (yuanxuns' RLHF-from-scratch uses 0.2 / 0.3)."""
    dual_clip: Optional[float] = None
    """dual-clip constant c > 1 for negative advantages (Ye et al. 2020; verl 3.0); None = off."""
    value_clip_range: Optional[float] = 0.2
    """value clip around the old values, baselines ppo2 ("N details" #19: 0.2; yuanxuns 1.0);
    None = unclipped value loss."""
    vf_coef: float = 0.1
    """value-loss coefficient ("N details" #19 and N+: 0.1; yuanxuns 0.5; PPO-max 1.0)."""
    ent_coef: float = 0.0
    """entropy bonus coefficient (0 in the N-details and N+ runs; optional in PPO-max)."""
    loss_aggregation: str = "token-mean"
    """"token-mean" (TRL, N-details code) or "seq-mean" (``AGGREGATIONS``)."""
    loss_group_rows: Optional[int] = None
    """average the loss over groups of this many consecutive rows of each minibatch (in its
    permutation order): each group's own ``loss_aggregation`` (its token mean), then the mean over
    the groups. This is the loss of a source that takes a token mean per rank and micro-batch and
    averages over ranks and accumulation steps, given as that source's rows per rank per
    micro-batch so the math does not depend on the world size this runs on: MOSS-RLHF
    ``train_ppo_en.sh`` 2 (``criterion``: ``sum(loss * mask) / mask.sum()`` over a rank's
    ``batch_size`` 2 rows, DeepSpeed averaging 7 ranks), summarize_from_feedback_details ``ppo.py``
    at 1B 16 (``masked_mean`` over ``local_micro_batch_size`` 16, 4 accumulation steps x 8 ranks).
    Needs an aggregation that takes per-row normalisers (token-mean, seq-mean) and a minibatch
    that is a multiple of it. None: one aggregate over the whole minibatch (TRL, the N-details code)."""
    score_position: str = "stop"
    """where the score lands and which tokens the critic learns (``algos.SCORE_POSITIONS``):
    "stop", the last trained token (the EOS under the EOS trick; MOSS-RLHF, OpenRLHF); "after_stop",
    one token past it, the first padding token, where the values are trained too (the value target
    there is the score): summarize_from_feedback_details ``ppo.py`` and TRL's PPOTrainer (TRL #3750)."""
    joint_grad_clip: bool = False
    """with a separate critic, clip the norm of the policy's and the critic's gradients together at
    ``max_grad_norm`` (MOSS-RLHF: one DeepSpeed engine over both models, ``gradient_clipping`` 1.0)
    instead of each model's norm on its own. The trainer needs ZeRO stage 0 and fp32 for it (the
    gradients must be whole before either engine steps)."""
    score_clip: Optional[float] = None
    """clip scores to [-c, c] before shaping (PPO-max reward clipping; DeepSpeed-Chat clips at 5)."""
    normalize_scores: bool = False
    """normalise scores by the running mean and std of every score seen (``algos.RunningMoments``,
    updated with each batch first), before ``score_clip`` (PPO-max reward normalisation; off in the
    N-details and N+ runs, which normalise the reward model once instead)."""
    score_norm_shift_mean: bool = True
    """with ``normalize_scores``: subtract the running mean (MOSS-RLHF ``use_reward_norm``); False
    only divides by the running std (MOSS-RLHF ``use_reward_scaling`` alone, its train_ppo_en.sh:
    ``rewards /= self.running.std`` in ``ppo_trainer.make_experiences``)."""
    score_norm_unbiased: bool = False
    """with ``normalize_scores``: running std with n - 1 (MOSS-RLHF ``utils.RunningMoments``) instead
    of n."""

    # -- update loop --
    num_epochs: int = 4
    """PPO epochs over each batch ("N details" #16: 4; N+: 4)."""
    num_minibatches: int = 1
    """minibatches per epoch, a fresh permutation each epoch ("N details" #16: 1 in the original)."""
    micro_batch_size: Optional[int] = None
    """rows per forward/backward inside a minibatch (gradient accumulation); None = the whole
    minibatch. The loss is normalised by the minibatch's token (or row) count, so this does not
    change the math, only memory."""
    max_tokens_per_micro_batch: Optional[int] = None
    """cut each rank's share of a minibatch into micro-batches of at most this many valid tokens
    (query + response; a longer row goes alone) instead of ``micro_batch_size`` rows: with packed
    sequences (``ppo.packing``) a forward costs its tokens. Every rank runs the same number of
    micro-batches (rlhf_fast/trainers/token_budget.py); the loss normalisation is unchanged. None = by rows."""
    trim_padding: bool = True
    """run each micro-batch's forwards (old, reference, values, update) on the columns its rows
    attend to: the response columns after every row's stop token and the prompt columns before
    every row's first token are dropped (``trainers/ppo_trim.py``); the reward model's batches too
    (``trainers/rollout.py:Scorer``). Same math (those positions are masked everywhere), float32
    rounding aside; False: every forward spans max_new_tokens."""
    max_grad_norm: Optional[float] = None
    """clip the global gradient norm before each optimizer step (TRL / OpenRLHF 1.0; the N-details
    and N+ runs: none). With a separate critic the policy's and the critic's norms are clipped
    separately (one DeepSpeed engine each, as OpenRLHF and DeepSpeed-Chat) unless
    ``joint_grad_clip`` (TRL, MOSS-RLHF: one norm over both)."""
    temperature: float = 1.0
    """divides the logits when computing log-probs, as in sampling ("N details" #10; N+ 0.7).
    PPO-max samples at 0.8 but scores log-probs from raw logits (1.0)."""
    top_k: Optional[int] = None
    """top-k of the distribution the old and new log-probs are computed under: None = the
    sampler's (``generation.top_k``, resolved by the PPO trainer), 0 = off. The engine samples from
    the filtered distribution, so the PPO ratio compares like with like only under the same filter
    (TRL issue 6789: ratio mean ~0.90 at top_p 0.8 without it)."""
    top_p: Optional[float] = None
    """top-p of that distribution: None = the sampler's (``generation.top_p``), 1.0 = off."""
    ref_filter: bool = False
    """also compute the reference log-probs (the KL) under the filter. Off by default: the KL is
    then that of the sampling policy to the reference model as it is, finite for every sampled
    token, whereas a token outside the reference's own top-k / top-p set has reference log-prob
    -inf (an infinite KL; the trainer stops with an error naming this field)."""

    # -- critic-free rollout shaping (DAPO; ``algos/critic_free.py``) --
    dynamic_sampling: bool = False
    """drop the groups whose scores are all equal and sample more prompts until the batch is
    full again (DAPO dynamic sampling, Yu et al. 2025 eq. 11; verl ``filter_groups.enable``).
    Needs groups (``ppo.samples_per_prompt`` > 1)."""
    max_sampling_rounds: int = 4
    """rollout rounds per iteration under ``dynamic_sampling`` (verl ``max_num_gen_batches``: 10);
    when they are spent the batch is completed with filtered-out groups of the last round (they
    carry zero advantage) and ``objective/sampling_rounds`` shows it."""
    overlong_buffer_fraction: Optional[float] = None
    """DAPO soft overlong punishment (Yu et al. 2025 eq. 13; verl ``overlong_buffer.len``): a
    response longer than max_new_tokens - buffer tokens, buffer = max(1, round(fraction x
    max_new_tokens)), loses up to ``overlong_penalty_factor`` linearly. A fraction so that one
    preset fits every response length: DAPO's 4096 of 20480 tokens is 0.2. None = off."""
    overlong_penalty_factor: float = 1.0
    """the punishment at max_new_tokens (DAPO: 1.0; verl ``overlong_buffer.penalty_factor``)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = (
            (ESTIMATORS, self.advantage_estimator), (KL_PLACEMENTS, self.kl_placement),
            (KL_CONTROLLERS, self.kl_controller), (POLICY_LOSSES, self.policy_loss),
            (AGGREGATIONS, self.loss_aggregation), (SCORE_POSITIONS, self.score_position),
        )
        for registry, name in checks:
            registry[name]  # ValueError listing the known names on a typo
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.num_epochs < 1 or self.num_minibatches < 1:
            raise ValueError(f"num_epochs and num_minibatches must be >= 1, got {self.num_epochs}, {self.num_minibatches}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be None or >= 1, got {self.micro_batch_size}")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ValueError(f"max_tokens_per_micro_batch must be None or >= 1, got {self.max_tokens_per_micro_batch}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be None or an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p!r}")
        if self.max_sampling_rounds < 1:
            raise ValueError(f"max_sampling_rounds must be >= 1, got {self.max_sampling_rounds}")
        if self.overlong_buffer_fraction is not None and not 0 < self.overlong_buffer_fraction <= 1:
            raise ValueError(f"overlong_buffer_fraction must be None or in (0, 1], got {self.overlong_buffer_fraction}")
        if self.dynamic_sampling and not self.estimator.needs_groups:
            raise ValueError(f"dynamic_sampling filters groups: it needs a group estimator (grpo, dr_grpo, rloo, ...), "
                             f"not {self.advantage_estimator!r}")
        if self.loss_group_rows is not None:
            if isinstance(self.loss_group_rows, bool) or not isinstance(self.loss_group_rows, int) \
                    or self.loss_group_rows < 1:
                raise ValueError(f"loss_group_rows must be None or an integer >= 1, got {self.loss_group_rows!r}")
            if not self.aggregation.per_row:
                raise ValueError(f"loss_group_rows averages each group's loss_aggregation over groups of rows, but "
                                 f"{self.loss_aggregation!r} takes no per-row normaliser: use token-mean or seq-mean, "
                                 "or loss_group_rows null")
        if self.joint_grad_clip and self.max_grad_norm is None:
            raise ValueError("joint_grad_clip clips the policy's and the critic's gradients together at max_grad_norm: "
                             "set max_grad_norm, or joint_grad_clip false")
        self.policy_loss_params()  # validates the clip ranges

    # -- derived views: components receive only what they need (docs/architecture.md) --

    @property
    def filters_logprobs(self) -> bool:
        """A top-k / top-p filter applies to the policy's log-probs."""
        return bool(self.top_k) or (self.top_p is not None and self.top_p < 1.0)

    def logprob_filter(self, *, reference: bool = False) -> dict:
        """``top_k`` / ``top_p`` keyword arguments of ``Policy.logprobs`` for the policy (or, with
        ``reference``, the reference: off unless ``ref_filter``)."""
        if reference and not self.ref_filter:
            return {"top_k": 0, "top_p": 1.0}
        return {"top_k": self.top_k or 0, "top_p": 1.0 if self.top_p is None else self.top_p}

    @property
    def estimator(self) -> AdvantageEstimator:
        """The advantage estimator's registry entry (``needs_values``, ``needs_groups``)."""
        return ESTIMATORS[self.advantage_estimator]

    @property
    def placement(self) -> KLPlacement:
        """The KL placement's registry entry (``in_reward`` / ``in_loss``, the coefficients)."""
        return KL_PLACEMENTS[self.kl_placement]

    @property
    def aggregation(self) -> Aggregation:
        """The loss aggregation's registry entry (``reduce``, the minibatch ``normalizer``)."""
        return AGGREGATIONS[self.loss_aggregation]

    @property
    def score_place(self) -> ScorePosition:
        """The score position's registry entry (``value_mask``, ``extra_columns``)."""
        return SCORE_POSITIONS[self.score_position]

    def policy_loss_params(self) -> PolicyLossParams:
        return PolicyLossParams(
            clip_low=self.clip_range, clip_high=self.clip_range_high, dual_clip=self.dual_clip,
            aggregation=self.loss_aggregation,
        )

    def advantage_params(self) -> AdvantageParams:
        return AdvantageParams(
            gamma=self.gamma, lam=self.lam, whiten_rewards=self.whiten_rewards,
            whiten_advantages=self.whiten_advantages, unbiased=self.whiten_unbiased, eps=self.whiten_eps,
        )

    def make_kl_controller(self):
        return make_kl_controller(self.kl_controller, init=self.kl_init, target=self.kl_target, horizon=self.kl_horizon)

    def replace(self, **changes) -> "PPOHyperParams":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, PPOHyperParams] = {
    # openai/lm-human-preferences train_policy.py (PpoHParams; launch.py's books tasks: kl_coef 0.15,
    # adaptive_kl target 6; policy.temperature 0.7), as reproduced by vwxyzjn/lm-human-preference-
    # details train_policy_accelerate.py. Per-minibatch reward whitening (shift_mean=False), GAE and
    # advantage whitening, as PPOTrainer.loss does; TF moments (variance over n), +1e-8; losses
    # averaged over every token of the minibatch. Which tokens: generation.after_stop "trained"
    # (config preset lm_human_preferences). Deviations: README "Presets and their sources".
    "lm_human_preferences": PPOHyperParams(
        gamma=1.0, lam=0.95, whiten_rewards=True, whiten_advantages=True, whiten_unbiased=False, whiten_eps=1e-8,
        advantages_per_minibatch=True, kl_estimator="k1", kl_placement="in_reward", kl_controller="adaptive",
        kl_init=0.15, kl_target=6.0, kl_horizon=10000.0, clip_range=0.2, value_clip_range=0.2, vf_coef=0.1,
        ent_coef=0.0, loss_aggregation="token-mean", num_epochs=4, num_minibatches=1, max_grad_norm=None,
        temperature=0.7,
    ),
    # "The N+ Implementation Details ... TL;DR": vwxyzjn/summarize_from_feedback_details ppo.py
    # (PpoHParams: whiten_rewards False, kl_coef 0.05; advantages whitened once per batch with a
    # biased masked variance, masked_whiten; temperature 0.7). This entry is also PPOConfig's default
    # algo, so the source's score one token past the EOS (score_position "after_stop") and its loss
    # per micro-batch of 16 rows (loss_group_rows 16) are set by the config preset "tldr"
    # (rlhf_fast/config/presets.py), not here. Deviations: README "Presets and their sources".
    "tldr": PPOHyperParams(
        gamma=1.0, lam=0.95, whiten_rewards=False, whiten_advantages=True, whiten_unbiased=False, whiten_eps=1e-8,
        advantages_per_minibatch=False, kl_estimator="k1", kl_placement="in_reward", kl_controller="fixed",
        kl_init=0.05, clip_range=0.2, value_clip_range=0.2, vf_coef=0.1, ent_coef=0.0, loss_aggregation="token-mean",
        num_epochs=4, num_minibatches=1, max_grad_norm=None, temperature=0.7,
    ),
    # "Secrets of RLHF, Part I" PPO-max as OpenLMLab/MOSS-RLHF's released launch runs it
    # (train_ppo_en.sh with config_ppo.py's defaults; ppo/ppo_trainer.py, ppo/ppo_datahelper.py,
    # utils.py): --use_reward_scaling without --use_reward_norm (scores divided by the running
    # std, n - 1, no mean shift), no --use_reward_clip, no --use_advantage_norm (when a user turns
    # whitening on, MOSS whitens per train batch, biased, +1e-6: those are set), token-level k1 KL
    # in the reward with kl_penalty_weight 0.01, --use_critic_loss_clip (value clip 0.2, 0.5 *
    # max), --use_policy_loss_clip (0.2), vf_loss_weight 1, one pass over the rollout buffer,
    # log-probs from raw logits, DeepSpeed gradient_clipping 1.0 (accelerate_config.yaml). The loss
    # per rank of 2 rows (loss_group_rows 2) and the clip over policy and critic together
    # (joint_grad_clip) are set by the config preset "ppo_max" with the critic's settings.
    "ppo_max": PPOHyperParams(
        gamma=1.0, lam=0.95, whiten_rewards=False, whiten_advantages=False, whiten_unbiased=False, whiten_eps=1e-6,
        advantages_per_minibatch=True, kl_estimator="k1", kl_placement="in_reward", kl_controller="fixed",
        kl_init=0.01, clip_range=0.2, value_clip_range=0.2, vf_coef=1.0, ent_coef=0.0, loss_aggregation="token-mean",
        score_clip=None, normalize_scores=True, score_norm_shift_mean=False, score_norm_unbiased=True,
        num_epochs=1, num_minibatches=1, max_grad_norm=1.0, temperature=1.0,
    ),
}

# ---- the critic-free family (no value model; ``samples_per_prompt`` > 1 makes the groups) --------
# Each follows its source's defaults for the PPO math; generation and batch sizes are in the
# config presets (``rlhf_fast/config/presets.py``).
# max_grad_norm 1.0: TRL GRPOConfig / RLOOConfig (TrainingArguments), verl actor grad_clip and OpenRLHF max_norm.
_CRITIC_FREE = dict(vf_coef=0.0, value_clip_range=None, gamma=1.0, lam=1.0, temperature=1.0, num_minibatches=1,
                    max_grad_norm=1.0)
PRESETS.update({
    # GRPO (Shao et al. 2024, DeepSeekMath §4.1): group-normalised outcome advantages, ratio clip 0.2,
    # KL to the reference in the loss with the k3 estimator and beta 0.04, per-sequence token means
    # (the 1/|o_i| of eq. 3); one policy update per batch (mu = 1, TRL num_iterations = 1).
    "grpo": PPOHyperParams(
        advantage_estimator="grpo", whiten_advantages=False, kl_placement="in_loss", kl_estimator="k3",
        kl_controller="fixed", kl_init=0.04, clip_range=0.2, loss_aggregation="seq-mean", num_epochs=1, **_CRITIC_FREE,
    ),
    # Dr. GRPO (Liu et al. 2025 §3.2): no std division, the constant normaliser rows x max length,
    # no KL (beta 0: "RL-tuning with rule-based verifiers"), ratio clip 0.2.
    "dr_grpo": PPOHyperParams(
        advantage_estimator="dr_grpo", whiten_advantages=False, kl_placement="in_loss", kl_estimator="k3",
        kl_controller="fixed", kl_init=0.0, clip_range=0.2, loss_aggregation="seq-mean-token-sum-norm", num_epochs=1,
        **_CRITIC_FREE,
    ),
    # DAPO (Yu et al. 2025, Algorithm 1): clip-higher (eps_low 0.2, eps_high 0.28), token-level
    # loss, no KL, dynamic sampling, soft overlong punishment (buffer 4096 of 20480 tokens: 0.2).
    "dapo": PPOHyperParams(
        advantage_estimator="grpo", whiten_advantages=False, kl_placement="in_loss", kl_estimator="k3",
        kl_controller="fixed", kl_init=0.0, clip_range=0.2, clip_range_high=0.28, loss_aggregation="token-mean",
        num_epochs=1, dynamic_sampling=True, overlong_buffer_fraction=0.2, **_CRITIC_FREE,
    ),
    # RLOO (Ahmadian et al. 2024; TRL RLOOConfig defaults): leave-one-out baseline, KL in the
    # reward (k1, beta 0.05), PPO clip 0.2, 4 epochs, no advantage whitening.
    "rloo": PPOHyperParams(
        advantage_estimator="rloo", whiten_advantages=False, kl_placement="in_reward", kl_estimator="k1",
        kl_controller="fixed", kl_init=0.05, clip_range=0.2, loss_aggregation="token-mean", num_epochs=4,
        **_CRITIC_FREE,
    ),
    # REINFORCE++ (Hu 2025; OpenRLHF --advantage_estimator reinforce): token KL in the reward (k1,
    # init_kl_coef 0.01), returns, global advantage whitening, PPO clip 0.2, token-level loss.
    "reinforce_pp": PPOHyperParams(
        advantage_estimator="reinforce_pp", whiten_advantages=True, kl_placement="in_reward", kl_estimator="k1",
        kl_controller="fixed", kl_init=0.01, clip_range=0.2, loss_aggregation="token-mean", num_epochs=1,
        **_CRITIC_FREE,
    ),
    # REINFORCE++-baseline (OpenRLHF --advantage_estimator reinforce_baseline --use_kl_loss
    # --kl_estimator k2): group-mean baseline, KL in the loss (k2, beta 0.01), global whitening.
    "reinforce_pp_baseline": PPOHyperParams(
        advantage_estimator="reinforce_pp_baseline", whiten_advantages=True, kl_placement="in_loss",
        kl_estimator="k2", kl_controller="fixed", kl_init=0.01, clip_range=0.2, loss_aggregation="token-mean",
        num_epochs=1, **_CRITIC_FREE,
    ),
    # GSPO (Zheng et al. 2025 §5.1; verl recipe): sequence-level ratio clipped at 3e-4 / 4e-4,
    # group-normalised advantages, per-sequence means, no KL.
    "gspo": PPOHyperParams(
        advantage_estimator="grpo", whiten_advantages=False, kl_placement="in_loss", kl_estimator="k3",
        kl_controller="fixed", kl_init=0.0, policy_loss="gspo", clip_range=3e-4, clip_range_high=4e-4,
        loss_aggregation="seq-mean", num_epochs=1, **_CRITIC_FREE,
    ),
})
