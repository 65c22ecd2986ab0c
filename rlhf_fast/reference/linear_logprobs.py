"""Reference log-probs straight from hidden states: the lm_head matmul, then ``gather_logprobs``.

The oracle for ``rlhf_fast.ops.linear_logprobs``. It materialises the full [..., V] logits in the
compute dtype, which is exactly what the fused op avoids.
"""

from __future__ import annotations

import torch

from rlhf_fast import _checks
from rlhf_fast.reference.logprobs import gather_logprobs


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    compute_dtype: torch.dtype | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """``gather_logprobs(hidden @ weight.T, labels, ...)``, the slow plain way.

    Args:
        hidden: (..., H) floating.
        weight: (V, H), the lm_head weight, same dtype as ``hidden``.
        labels: (...) integer; entries equal to ``ignore_index`` give 0 and no gradient.
        compute_dtype: the dtype of the matmul and the log-softmax. Default: float64 for float64
            inputs, else float32 (a peer upcasting bf16 hidden states and weight).
        top_k, top_p: the engine's sampling filter, as in ``gather_logprobs`` (its kept set is
            decided on the float32 logits this matmul gives in ``compute_dtype``).
    Returns:
        logprobs (...) in ``compute_dtype``, and entropy (...) if ``return_entropy``.
    """
    temperature = _checks.check_linear_logprob_inputs(hidden, weight, labels, temperature, ignore_index)
    if compute_dtype is None:
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    return gather_logprobs(
        logits,
        labels,
        temperature=temperature,
        return_entropy=return_entropy,
        ignore_index=ignore_index,
        compute_dtype=compute_dtype,
        top_k=top_k,
        top_p=top_p,
    )
