"""Policy wrappers by name (``ppo.policy_wrapper``): what the PPO trainer builds its policy and its
frozen reference from, so no trainer names a wrapper class (docs/architecture.md, "Variation
points"). A new wrapper is one module with a class that keeps ``PolicyWrapper``'s contract, plus
one ``POLICY_WRAPPERS`` line (``tests/test_generation_backends.py`` registers one from the test file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, runtime_checkable

from torch import nn

from rlhf_fast._registry import Registry
from rlhf_fast.models.policy import Policy


@runtime_checkable
class PolicyWrapper(Protocol):
    """What the trainer, the engine and the losses use of a policy (``policy.Policy`` keeps it):

    - ``model``: the Hugging Face causal LM inside (the engine generates with it; LoRA adds its
      adapters to it; the reference is a copy of it);
    - ``value_head``: the scalar head on the final hidden state, or None (``ppo.critic value_head``);
    - ``backbone``: the transformer body (a separate critic starts from a copy of it);
    - ``logprobs(input_ids, attention_mask, *, temperature, return_entropy, response_start,
      position_ids, top_k, top_p)``: an object with ``logprobs`` / ``entropy`` (b, R) float32 and
      ``values`` (b, R) or None, as ``Policy.logprobs`` returns.
    """

    model: nn.Module
    value_head: Optional[nn.Module]

    @property
    def backbone(self) -> nn.Module:
        ...

    def logprobs(self, input_ids, attention_mask, **kwargs) -> Any:
        ...


@dataclass(frozen=True)
class PolicyWrapperType:
    """load(source, *, value_head, seed, attn_implementation, use_linear_logprobs, logits_budget_mb)
    -> the trained policy from a model directory, a config or a model (``Policy.from_pretrained``'s
    arguments); wrap(causal_lm, *, use_linear_logprobs, logits_budget_mb) -> a wrapper around a
    causal LM with no value head (the frozen reference of full fine-tuning is ``wrap`` of a copy of the policy's ``model``)."""

    load: Callable[..., PolicyWrapper]
    wrap: Callable[..., PolicyWrapper]


POLICY_WRAPPERS: Registry[PolicyWrapperType] = Registry("policy wrapper")
POLICY_WRAPPERS.register("policy")(PolicyWrapperType(load=Policy.from_pretrained, wrap=Policy))


def policy_wrapper_names() -> tuple[str, ...]:
    """The values ``ppo.policy_wrapper`` accepts."""
    return POLICY_WRAPPERS.names()
