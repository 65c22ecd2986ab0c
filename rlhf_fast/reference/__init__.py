"""The slow oracles of the ops: plain PyTorch, float64-capable, the same signatures as
``rlhf_fast.ops``. The slow twin of a whole PPO iteration, which needs algos and the models, lives
above them in ``rlhf_fast.trainers.parity.ppo_reference`` (imports only run downward:
docs/architecture.md, "Layers"). The float64 re-derivations of the paper presets' sources, the
oracles of tests/test_preset_parity*.py, are modules here too: ``lm_human_preferences``
(openai/lm-human-preferences), ``summarize_from_feedback`` (summarize_from_feedback_details
``ppo.py``), ``moss_rlhf`` (MOSS-RLHF ``ppo/ppo_trainer.py``)."""

from rlhf_fast.reference.linear_logprobs import linear_logprobs
from rlhf_fast.reference.logprobs import gather_logprobs
from rlhf_fast.reference.off_policy import behaviour_weights, decoupled_ppo_loss
from rlhf_fast.reference.multiturn import episode_layout, multiturn_advantages
from rlhf_fast.reference.rlmath import gae, kl_penalty, masked_mean, masked_var, masked_whiten, shape_rewards

__all__ = [
    "gather_logprobs", "linear_logprobs", "behaviour_weights", "decoupled_ppo_loss",
    "kl_penalty", "shape_rewards", "gae", "masked_mean", "masked_var", "masked_whiten",
    "episode_layout", "multiturn_advantages",
]

