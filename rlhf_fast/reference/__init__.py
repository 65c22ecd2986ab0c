"""The slow oracle: plain PyTorch, float64-capable, the same signatures as ``rlhf_fast.ops``."""

from rlhf_fast.reference.linear_logprobs import linear_logprobs
from rlhf_fast.reference.logprobs import gather_logprobs

__all__ = ["gather_logprobs", "linear_logprobs"]
