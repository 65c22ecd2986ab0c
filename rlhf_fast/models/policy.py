"""The policy: a Hugging Face causal LM with an optional value head on the same backbone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from rlhf_fast import _checks
from rlhf_fast.models import _io
from rlhf_fast.models.heads import (
    DEFAULT_LOGITS_BUDGET_MB,
    FusedHeadLogprobs,
    check_linear_logprob_mode,
    use_fused_head,
    ScalarHead,
    init_value_head,
    logprobs_from_hidden,
    position_ids_from_mask,
    shifted_labels,
)
from rlhf_fast.models.backbone import backbone_of, hidden_size_of
from rlhf_fast.models.loading import Source, load_causal_lm
from rlhf_fast.models.packing import attention_context, packed_backbone

# Config attributes of architectures whose logits are not just lm_head(hidden) (Gemma-2
# soft-capping, Cohere's logit scale): the hidden-state path would give wrong log-probs.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale")


def check_input_ids(input_ids, attention_mask) -> None:
    _checks.check_tensor("input_ids", input_ids, floating=False)
    _checks.check_tensor("attention_mask", attention_mask)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    _checks.check_same_device(input_ids=input_ids, attention_mask=attention_mask)


def run_backbone(backbone: nn.Module, input_ids, attention_mask, position_ids=None, *, packing: bool = False
                 ) -> torch.Tensor:
    """Final hidden state (B, T, H) of a HF backbone, with ``position_ids = cumsum(mask) - mask``
    unless given (left padding then reproduces the unpadded outputs). With ``packing`` the backbone
    runs on the valid tokens only (``models/packing.py``; positions are then always
    ``cumsum(mask) - mask``, what every collator passes) and pad positions hold zeros."""
    check_input_ids(input_ids, attention_mask)
    hidden = packed_backbone(backbone, input_ids, attention_mask) if packing else None
    if hidden is not None:  # None: not packing, or a mask with a hole (run padded)
        return hidden
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    with attention_context(backbone, input_ids.shape[1]):
        out = backbone(input_ids=input_ids, attention_mask=attention_mask.long(), position_ids=position_ids,
                       use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def response_slice(hidden: torch.Tensor, response_start: Optional[int]) -> torch.Tensor:
    """Hidden states that predict tokens ``response_start .. T-1``: positions
    ``response_start - 1 .. T-2`` (all of ``0 .. T-2`` when ``response_start`` is None)."""
    T = hidden.shape[1]
    start = 1 if response_start is None else int(response_start)
    if not 1 <= start <= T:
        raise ValueError(f"response_start must be in [1, {T}] for sequences of length {T}, got {response_start}")
    return hidden[:, start - 1 : T - 1]


@dataclass
class PolicyOutput:
    """Result of ``Policy.forward``.

    hidden: (B, T, H) final hidden state (after the final norm), the LM head's input.
    values: (B, T) float32 value-head outputs, or None without a value head.
    """

    hidden: torch.Tensor
    values: Optional[torch.Tensor] = None


@dataclass
class PolicyLogProbs:
    """Result of ``Policy.logprobs``; every tensor covers the predicted tokens
    ``response_start .. T-1`` (N = T - response_start; N = T - 1 when response_start is None).

    logprobs: (B, N) float32 log-probs of the tokens under ``softmax(logits / temperature)``
        (top-k / top-p filtered and renormalised when asked); 0 where the target token is padding.
    entropy: (B, N) float32 entropy of that distribution, or None.
    values: (B, N) float32 values of the states that predict those tokens, or None.
    hidden: (B, N, H) the hidden states they came from.
    """

    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
    values: Optional[torch.Tensor]
    hidden: torch.Tensor


class Policy(nn.Module):
    """A causal LM plus an optional scalar value head on its final hidden state.

    ``model`` stays a plain Hugging Face model (``policy.model.generate`` works); the value head,
    when present, is zero-initialised ("The N Implementation Details of RLHF with PPO" #11).
    ``use_linear_logprobs`` True computes log-probs with ``ops.linear_logprobs`` straight from the
    hidden state when that op exists, never storing the logits; "auto" stores them, in row chunks
    that fit ``logits_budget_mb`` under activation checkpointing when a call's logits would exceed it
    (``heads.chunk_rows``; docs/architecture.md "Log-probs from hidden states").
    """

    def __init__(self, model: PreTrainedModel, *, value_head: bool = False, use_linear_logprobs: bool | str = "auto",
                 logits_budget_mb: float = DEFAULT_LOGITS_BUDGET_MB):
        super().__init__()
        for key in _LOGIT_TRANSFORMS:
            if getattr(model.config, key, None) is not None:
                raise ValueError(
                    f"{type(model).__name__} transforms its logits ({key}={getattr(model.config, key)}); "
                    "log-probs from the hidden state would be wrong, so it is not supported"
                )
        if model.get_output_embeddings() is None:
            raise ValueError(f"{type(model).__name__} has no LM head (get_output_embeddings() is None)")
        self.model = model
        self.value_head = init_value_head(ScalarHead(hidden_size_of(model.config))) if value_head else None
        check_linear_logprob_mode(use_linear_logprobs, logits_budget_mb)
        self.use_linear_logprobs = use_linear_logprobs
        self.logits_budget_mb = logits_budget_mb
        # run the backbone on packed sequences (models/packing.py); the trainer sets it from <stage>.packing
        self.packing = False
        # the fused path as a module call, so ZeRO-3 gathers lm_head.weight around it (no parameters of its own)
        self.fused_head = FusedHeadLogprobs(model)

    # ---- construction / persistence -----------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        source: Source,
        *,
        value_head: Optional[bool] = None,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        seed: int | None = None,
        use_linear_logprobs: bool | str = "auto",
        logits_budget_mb: float = DEFAULT_LOGITS_BUDGET_MB,
    ) -> "Policy":
        """Loads from a local directory (a plain HF causal LM or one saved by ``save_pretrained``)
        or builds from a config. ``value_head=None`` keeps a saved value head if there is one;
        True adds a zero-initialised one when none was saved; False drops it."""
        tensors, meta = ({}, {}) if not isinstance(source, (str, os.PathLike)) else _io.load_extras(source)
        if meta and meta.get("kind") != "policy":  # before loading: a reward model's body has no LM head
            raise ValueError(f"{source}: saved as a {meta.get('kind')!r}, not a policy")
        model = load_causal_lm(source, dtype=dtype, attn_implementation=attn_implementation, seed=seed)
        saved_head = _io.head_tensors(tensors, "value_head.", source, "policy with a value head") \
            if meta.get("value_head") else {}
        want_head = bool(saved_head) if value_head is None else value_head
        policy = cls(model, value_head=want_head, use_linear_logprobs=use_linear_logprobs,
                     logits_budget_mb=logits_budget_mb)
        if want_head and saved_head:
            policy.value_head.load_state_dict(saved_head)
        return policy

    def save_pretrained(self, directory, **hf_kwargs) -> None:
        """HF files of the causal LM, plus the value head in ``rlhf_fast_heads.safetensors``."""
        self.model.save_pretrained(directory, **hf_kwargs)
        tensors = {}
        if self.value_head is not None:
            tensors = {f"value_head.{k}": v for k, v in self.value_head.state_dict().items()}
        _io.save_extras(directory, tensors, {"kind": "policy", "value_head": self.value_head is not None})

    # ---- accessors ----------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def backbone(self) -> nn.Module:
        return backbone_of(self.model)

    @property
    def lm_head(self) -> nn.Module:
        """The output projection; ``lm_head.weight`` (V, H) is what ``ops.linear_logprobs`` takes."""
        return self.model.get_output_embeddings()

    # ---- forward helpers ----------------------------------------------------------------

    def forward(self, input_ids, attention_mask, position_ids=None) -> PolicyOutput:
        """Final hidden state (and values) for (B, T) ``input_ids`` / ``attention_mask``; position
        ids default to ``cumsum(mask) - mask``. The LM head is not applied."""
        hidden = run_backbone(self.backbone, input_ids, attention_mask, position_ids, packing=self.packing)
        values = self.value_head(hidden) if self.value_head is not None else None
        return PolicyOutput(hidden=hidden, values=values)

    def logits(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """(B, T, V) logits in the model's dtype (for callers that want them whole)."""
        return self.lm_head(self.forward(input_ids, attention_mask, position_ids).hidden)

    def logprobs(
        self,
        input_ids,
        attention_mask,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
        response_start: Optional[int] = None,
        position_ids=None,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> PolicyLogProbs:
        """Log-probs of each sequence's own next tokens: entry t is ``log p(input_ids[:, s + t] |
        prefix)`` for s = ``response_start`` (default 1, i.e. every token after the first). Only
        the hidden states that predict those tokens go through the LM head. Padded targets give 0.
        ``temperature`` divides the logits, as in sampling ("N Implementation Details" #10);
        ``top_k`` / ``top_p`` apply the engine's sampling filter after it (0 / 1.0 = off), so the
        log-probs (and entropy) are those of the distribution the engine samples from, renormalised
        over its kept set (a target outside the set gets -inf; see ``ops.gather_logprobs``)."""
        out = self.forward(input_ids, attention_mask, position_ids)
        hidden = response_slice(out.hidden, response_start)
        start = 1 if response_start is None else int(response_start)
        labels = shifted_labels(input_ids, attention_mask)[:, start - 1 :]
        head_kw = dict(temperature=temperature, return_entropy=return_entropy, top_k=top_k, top_p=top_p)
        if self.packing:  # the LM head only on the states whose target is a real token; pads read 0
            logprobs, entropy = _head_on_targets(self._head_logprobs, hidden, labels, **head_kw)
        else:
            res = self._head_logprobs(hidden, labels, **head_kw)
            logprobs, entropy = res if return_entropy else (res, None)
        values = response_slice(out.values, response_start) if out.values is not None else None
        return PolicyLogProbs(logprobs=logprobs, entropy=entropy, values=values, hidden=hidden)

    def _head_logprobs(self, hidden, labels, **kw):
        """The LM head's log-probs of ``labels`` from ``hidden`` (..., H): the fused op (``true``), the
        stored logits (``false``), or under "auto" the stored logits in row chunks that fit
        ``logits_budget_mb`` (``heads.chunk_rows``, decided per call from the rows' count)."""
        if use_fused_head(self.use_linear_logprobs, hidden, self.lm_head, self.logits_budget_mb):
            self.fused_head.register_zero3_weight()
            return self.fused_head(hidden, labels, **kw)
        return logprobs_from_hidden(hidden, self.lm_head, labels, use_linear_logprobs=self.use_linear_logprobs,
                                    logits_budget_mb=self.logits_budget_mb, **kw)


def _head_on_targets(head, hidden, labels, **kw):
    """``head`` (hidden (M, H), labels (M,) -> log-probs [, entropy]) on the (B, N) positions whose
    label is a real token, scattered back to (B, N) float32 with 0 elsewhere."""
    keep = labels.reshape(-1) != -100  # (B * N,)
    idx = keep.nonzero().squeeze(-1)
    res = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx), labels.reshape(-1)[idx], **kw)
    return_entropy = kw.get("return_entropy", False)
    parts = res if return_entropy else (res,)
    full = [p.new_zeros(labels.numel()).index_copy(0, idx, p).view(labels.shape) for p in parts]
    return (full[0], full[1]) if return_entropy else (full[0], None)
