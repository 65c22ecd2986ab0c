"""PPO building blocks as small pure functions with registries (docs/architecture.md, "Variation points"): policy losses, the
clipped value loss, entropy bonus, KL placement and controllers, advantage estimators, response
truncation and penalties, typed rollout / statistics containers and the shared hyper-parameters.

Functions that run RL math ops take ``backend=`` (``rlhf_fast.ops`` by default, or
``rlhf_fast.reference``); importing this package does not build the C++ ops.
"""

from rlhf_fast.algos.advantages import (
    ESTIMATORS,
    AdvantageEstimator,
    AdvantageInput,
    AdvantageParams,
    compute_advantages,
    contiguous_group_ids,
    gae_advantages,
    grpo_advantages,
    register_estimator,
    rloo_advantages,
    sequence_rewards,
)
from rlhf_fast.algos.critic_free import (
    dr_grpo_advantages,
    gspo_loss,
    informative_groups,
    overlong_penalty,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    seq_mean_token_sum_norm,
)
from rlhf_fast.algos.hparams import PRESETS, PPOHyperParams
from rlhf_fast.algos.kl import KL_PLACEMENTS, KLPlacement, compute_rewards
from rlhf_fast.algos.kl_control import KL_CONTROLLERS, AdaptiveKLController, FixedKLController, make_kl_controller
from rlhf_fast.algos.losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    Aggregation,
    PolicyLossOutput,
    PolicyLossParams,
    ValueLossOutput,
    aggregate,
    approxkl_per_token,
    group_normalizer,
    clipped_value_loss,
    entropy_bonus,
    kl_loss,
    policy_loss,
    ppo_clip_loss,
    vanilla_pg_loss,
)
from rlhf_fast.algos.off_policy import (
    OFF_POLICY_CORRECTIONS,
    OffPolicyCorrection,
    WeightStats,
    behaviour_weights,
    decoupled_advantages,
)
from rlhf_fast.algos.registry import Registry
from rlhf_fast.algos.running import RunningMoments
from rlhf_fast.algos.truncation import (
    AFTER_STOP,
    MISSING_STOP_PENALTIES,
    SCORE_POSITIONS,
    PostprocessedResponses,
    ScorePosition,
    Truncation,
    apply_missing_stop_penalty,
    first_stop_index,
    last_true_index,
    postprocess_responses,
    truncate_at_stop,
)
from rlhf_fast.algos.types import (
    MINIBATCH_METRIC_NAMES,
    OBJECTIVE_METRIC_NAMES,
    MinibatchStats,
    ObjectiveStats,
    PPOStats,
    Rollout,
    objective_stats,
)

__all__ = [
    "AFTER_STOP", "AGGREGATIONS", "ESTIMATORS", "KL_CONTROLLERS", "KL_PLACEMENTS", "MINIBATCH_METRIC_NAMES", "MISSING_STOP_PENALTIES",
    "OBJECTIVE_METRIC_NAMES", "OFF_POLICY_CORRECTIONS", "POLICY_LOSSES", "PRESETS", "SCORE_POSITIONS", "ScorePosition",
    "OffPolicyCorrection", "WeightStats", "behaviour_weights", "decoupled_advantages",
    "AdaptiveKLController", "AdvantageEstimator", "AdvantageInput", "AdvantageParams", "Aggregation",
    "FixedKLController", "KLPlacement", "MinibatchStats", "ObjectiveStats", "PPOHyperParams", "PPOStats",
    "PolicyLossOutput", "PolicyLossParams", "PostprocessedResponses", "Registry", "Rollout", "RunningMoments",
    "Truncation", "ValueLossOutput",
    "aggregate", "group_normalizer", "apply_missing_stop_penalty", "approxkl_per_token", "clipped_value_loss", "compute_advantages", "compute_rewards",
    "contiguous_group_ids", "entropy_bonus", "first_stop_index", "gae_advantages", "grpo_advantages", "kl_loss",
    "last_true_index", "make_kl_controller", "objective_stats", "policy_loss", "postprocess_responses", "ppo_clip_loss",
    "register_estimator", "rloo_advantages", "sequence_rewards",
    "truncate_at_stop", "vanilla_pg_loss",
    "dr_grpo_advantages", "gspo_loss", "informative_groups", "overlong_penalty", "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages", "seq_mean_token_sum_norm",
]
