"""The slow oracle: plain PyTorch, float64-capable, the same signatures as ``rlhf_fast.ops``."""

from rlhf_fast.reference.linear_logprobs import linear_logprobs
from rlhf_fast.reference.logprobs import gather_logprobs
from rlhf_fast.reference.rlmath import gae, kl_penalty, masked_mean, masked_var, masked_whiten, shape_rewards

__all__ = [
    "gather_logprobs", "linear_logprobs",
    "kl_penalty", "shape_rewards", "gae", "masked_mean", "masked_var", "masked_whiten",
    "ppo_iteration", "make_experience", "ReferencePPOResult",
]


def __getattr__(name):
    # The reference PPO is imported lazily: it pulls in rlhf_fast.algos and the models
    # (transformers), which the reference ops and their users do not need.
    if name in ("ppo_iteration", "make_experience", "ReferencePPOResult"):
        from rlhf_fast.reference import ppo

        return getattr(ppo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
