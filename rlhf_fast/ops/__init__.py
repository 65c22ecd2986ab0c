"""The public fused ops: ``torch.ops.rlhf_fast.*`` custom ops (C++ on CPU, Triton on CUDA, fake
kernels for torch.compile, autograd) behind validated Python functions. Importing this package
builds the C++ library on first use (cached)."""

from rlhf_fast.ops.linear_logprobs import linear_logprobs
from rlhf_fast.ops.logprobs import gather_logprobs
from rlhf_fast.ops import sampling as _sampling  # noqa: F401  (registers kept_cut / sample_tokens)
from rlhf_fast.ops.rlmath import gae, kl_penalty, masked_mean, masked_var, masked_whiten, shape_rewards

__all__ = [
    "gather_logprobs", "linear_logprobs",
    "kl_penalty", "shape_rewards", "gae", "masked_mean", "masked_var", "masked_whiten",
]
