"""The slow oracles of the ops: plain PyTorch, float64-capable, the same signatures as
``rlhf_fast.ops``. The slow twin of a whole PPO iteration, which needs algos and the models, lives
above them in ``rlhf_fast.trainers.parity.ppo_reference`` (imports only run downward:
docs/architecture.md, "Layers")."""

from rlhf_fast.reference.linear_logprobs import linear_logprobs
from rlhf_fast.reference.logprobs import gather_logprobs
from rlhf_fast.reference.multiturn import episode_layout, multiturn_advantages
from rlhf_fast.reference.rlmath import gae, kl_penalty, masked_mean, masked_var, masked_whiten, shape_rewards

__all__ = [
    "gather_logprobs", "linear_logprobs",
    "kl_penalty", "shape_rewards", "gae", "masked_mean", "masked_var", "masked_whiten",
    "episode_layout", "multiturn_advantages",
]

