"""The reward model (backbone + scalar head + stored normalisation) and the separate critic.

A reward model loads from rlhf_fast's own format (``RewardModel.save_pretrained``: the backbone in
HF format, the head and normalisation in ``rlhf_fast_heads.safetensors`` / ``rlhf_fast.json``) or
from a Hugging Face ``AutoModelForSequenceClassification`` directory with ``num_labels == 1`` (the
TRL / OpenRLHF format: ``Qwen2ForSequenceClassification``, ``LlamaForSequenceClassification``,
``GPT2ForSequenceClassification``...), whose trained ``score`` head becomes the reward head. A
directory that holds no trained reward head is a ValueError naming what it holds: a fresh head
is drawn only when the caller asks for one (``new_head=True``, reward-model training).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from rlhf_fast._registry import Registry
from rlhf_fast.models import _io
from rlhf_fast.models.heads import (
    ScalarHead,
    gather_last_valid,
    init_reward_head,
    init_value_head,
)
from rlhf_fast.models.hf_classifier import describe_model_dir, load_hf_reward_parts
from rlhf_fast.models.backbone import backbone_of, hidden_size_of
from rlhf_fast.models.loading import (
    Source,
    _local_dir,
    check_vocab_fits,
    is_sequence_classifier,
    load_backbone,
    tokenizer_disagreement,
)
from rlhf_fast.models.policy import check_input_ids, response_slice, run_backbone


@dataclass
class RewardOutput:
    """Result of ``RewardModel.forward``.

    scores: (B,) float32 normalised score ``gain * raw_scores + bias``.
    raw_scores: (B,) float32 head output at each row's last valid token (N details #7; N+ reads
        it at the EOS token, which is the last valid token once responses are truncated after EOS),
        or, for a reward model from an HF sequence classifier, at the last valid token that is not
        its pad id (``RewardModel.read_mask``), as transformers reads it.
    rewards: (B, T) float32 raw head output at every position (N details #1: per-token outputs).
    hidden: (B, T, H) final hidden state.
    """

    scores: torch.Tensor
    raw_scores: torch.Tensor
    rewards: torch.Tensor
    hidden: torch.Tensor


@dataclass
class CriticOutput:
    """values: (B, N) float32; N = T without ``response_start``, else the T - response_start
    states that predict the response tokens (aligned with ``Policy.logprobs``). hidden: (B, T, H)."""

    values: torch.Tensor
    hidden: torch.Tensor


def _backbone_from(source, *, dtype, attn_implementation, seed):
    if isinstance(source, PreTrainedModel):
        # An in-memory model (e.g. the SFT policy): copy its body, never share weights.
        body = backbone_of(source) if source.get_output_embeddings() is not None else source
        return copy.deepcopy(body)
    return load_backbone(source, dtype=dtype, attn_implementation=attn_implementation, seed=seed)


def _extras(source):
    return _io.load_extras(source) if isinstance(source, (str, os.PathLike)) else ({}, {})


class RewardModel(nn.Module):
    """Backbone + scalar reward head; the score is read at the last valid token.

    Normalisation is stored with the model as two float32 buffers, ``gain`` and ``bias``
    (``scores = gain * raw + bias``), set by:

    - ``calibrate(...)`` / ``set_normalization(raw_scores)``: gain and bias so that the given
      samples score mean 0 and std 1 (population std, as TF's ``tf.nn.moments``) - "The N
      Implementation Details of RLHF with PPO" #9, done before and after RM training on responses
      sampled from the fixed initial policy;
    - ``calibrate(..., reference=True)`` / ``set_reference_normalization(raw_scores)``: gain 1 and
      bias = -mean, so reference responses (the SFT dataset's human summaries) score 0 on average
      (N+ TL;DR).

    The score is read at each row's last attended token, skipping tokens equal to
    ``score_skip_token_id`` when it is set: a model loaded from a Hugging Face sequence-classification
    directory reads where transformers does (the last token that is not its config's pad id), so
    its scores equal the HF model's own.
    """

    def __init__(self, backbone: PreTrainedModel, *, seed: int | None = None, score_skip_token_id: Optional[int] = None):
        super().__init__()
        self.backbone = backbone
        self.head = init_reward_head(ScalarHead(hidden_size_of(backbone.config)), seed=seed)
        self.register_buffer("gain", torch.ones((), dtype=torch.float32))
        self.register_buffer("bias", torch.zeros((), dtype=torch.float32))
        self.normalization: dict = {"mode": None}
        self.score_skip_token_id = score_skip_token_id
        self.packing = False  # the backbone on packed sequences (models/packing.py); set from <stage>.packing

    @classmethod
    def from_pretrained(
        cls,
        source: Source | PreTrainedModel,
        *,
        new_head: bool = False,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        seed: int | None = None,
    ) -> "RewardModel":
        """A reward model with its trained head, from

        - a directory written by ``save_pretrained`` (head and normalisation restored), or
        - a Hugging Face ``AutoModelForSequenceClassification`` directory with ``num_labels == 1``
          (TRL / OpenRLHF reward models): its trained ``score`` layer is the head, gain 1, bias 0,
          and the score is read where transformers reads it (``score_skip_token_id``).

        Any other source holds no trained reward head: a ValueError naming what it holds, unless
        ``new_head=True`` (reward-model training): then a plain HF (causal) LM directory or
        in-memory model such as the SFT policy's (N+: the RM starts from the SFT model) or a config
        (random backbone) gets a fresh head drawn from ``seed``."""
        if isinstance(source, (str, os.PathLike)):
            path = _local_dir(source)
            if is_sequence_classifier(path):
                parts = load_hf_reward_parts(path, dtype=dtype, attn_implementation=attn_implementation)
                rm = cls(parts.backbone, seed=seed, score_skip_token_id=parts.pad_token_id)
                rm.head.load_state_dict(parts.head)
                rm.normalization = {"mode": None, "source": "hf_sequence_classification"}
                return rm
            tensors, meta = _io.load_extras(path)
            kind = meta.get("kind")
            if kind == "reward_model":
                head = _io.head_tensors(tensors, "head.", path, "reward_model")
                if not {"gain", "bias"} <= set(tensors):
                    raise ValueError(f"{path}: {_io.META_FILE} says it holds a reward_model, but {_io.HEADS_FILE} "
                                     "lacks its normalisation (gain / bias)")
                rm = cls(_backbone_from(path, dtype=dtype, attn_implementation=attn_implementation, seed=seed),
                         seed=seed, score_skip_token_id=meta.get("score_skip_token_id"))
                rm.head.load_state_dict(head)
                rm.gain.copy_(tensors["gain"])
                rm.bias.copy_(tensors["bias"])
                rm.normalization = dict(meta.get("normalization", {"mode": None}))
                return rm
            if kind not in (None, "policy"):
                raise ValueError(f"{path}: saved as a {kind!r}; a reward model loads from a reward_model, a "
                                 "sequence-classification model, or (to train one) a policy or plain LM")
            if not new_head:
                raise ValueError(
                    f"{path} holds no trained reward head: it holds {describe_model_dir(path)}. Give a reward model "
                    "(a directory written by rlhf-fast rm, or an AutoModelForSequenceClassification directory with "
                    "num_labels = 1)")
        elif not new_head:
            raise ValueError(f"a {type(source).__name__} holds no trained reward head; pass new_head=True to draw one")
        return cls(_backbone_from(source, dtype=dtype, attn_implementation=attn_implementation, seed=seed), seed=seed)

    def save_pretrained(self, directory, **hf_kwargs) -> None:
        self.backbone.save_pretrained(directory, **hf_kwargs)
        tensors = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        tensors.update(gain=self.gain, bias=self.bias)
        meta = {"kind": "reward_model", "normalization": self.normalization}
        if self.score_skip_token_id is not None:
            meta["score_skip_token_id"] = int(self.score_skip_token_id)
        _io.save_extras(directory, tensors, meta)

    @property
    def config(self):
        return self.backbone.config

    def read_mask(self, input_ids, attention_mask) -> torch.Tensor:
        """(B, T) bool: the tokens the score may be read at (the last one is): attended tokens,
        without those equal to ``score_skip_token_id`` when it is set; a row with no such token
        falls back to its attended tokens."""
        mask = attention_mask.bool()
        if self.score_skip_token_id is None:
            return mask
        read = mask & (input_ids != self.score_skip_token_id)
        return torch.where(read.any(-1, keepdim=True), read, mask)

    def forward(self, input_ids, attention_mask, position_ids=None) -> RewardOutput:
        check_input_ids(input_ids, attention_mask)
        # Padded positions are never attended: give them id 0 so a pad id the backbone's embedding
        # has no row for (a "[PAD]" added to a policy's tokenizer, unknown to an HF reward model)
        # cannot index past it.
        safe_ids = input_ids.masked_fill(~attention_mask.bool(), 0)
        hidden = run_backbone(self.backbone, safe_ids, attention_mask, position_ids, packing=self.packing)
        rewards = self.head(hidden)
        raw = gather_last_valid(rewards, self.read_mask(input_ids, attention_mask))
        return RewardOutput(scores=self.normalize(raw), raw_scores=raw, rewards=rewards, hidden=hidden)

    def normalize(self, raw_scores: torch.Tensor) -> torch.Tensor:
        return raw_scores * self.gain + self.bias

    # ---- normalisation ------------------------------------------------------------------

    def set_normalization(self, raw_scores: torch.Tensor, *, target_mean: float = 0.0, target_std: float = 1.0) -> None:
        """Gain and bias so that ``normalize(raw_scores)`` has mean ``target_mean`` and population
        std ``target_std`` (N details #9)."""
        raw = raw_scores.detach().double().flatten()
        if raw.numel() < 2:
            raise ValueError(f"raw_scores needs at least 2 samples to set a std, got {raw.numel()}")
        mean, std = raw.mean(), raw.std(unbiased=False)
        if not torch.isfinite(std) or float(std) == 0.0:
            raise ValueError(f"raw_scores have std {float(std)}; cannot normalise to std {target_std}")
        gain = target_std / std
        self.gain.fill_(float(gain))
        self.bias.fill_(float(target_mean - gain * mean))
        self.normalization = {
            "mode": "samples", "num_samples": int(raw.numel()), "raw_mean": float(mean), "raw_std": float(std),
            "target_mean": float(target_mean), "target_std": float(target_std),
        }

    def set_reference_normalization(self, raw_scores: torch.Tensor) -> None:
        """Gain 1, bias = -mean(raw_scores): reference responses score 0 on average (N+ TL;DR)."""
        raw = raw_scores.detach().double().flatten()
        if raw.numel() < 1:
            raise ValueError("raw_scores is empty")
        mean = raw.mean()
        self.gain.fill_(1.0)
        self.bias.fill_(float(-mean))
        self.normalization = {"mode": "reference_mean", "num_samples": int(raw.numel()), "raw_mean": float(mean)}

    @torch.no_grad()
    def raw_scores(self, input_ids, attention_mask, *, batch_size: int = 64) -> torch.Tensor:
        """Raw (unnormalised) scores of many sequences, ``batch_size`` rows at a time."""
        out = []
        for i in range(0, input_ids.shape[0], batch_size):
            out.append(self.forward(input_ids[i : i + batch_size], attention_mask[i : i + batch_size]).raw_scores)
        return torch.cat(out) if out else torch.empty(0)

    def calibrate(self, input_ids, attention_mask, *, reference: bool = False, batch_size: int = 64) -> torch.Tensor:
        """Scores the given sequences and sets the normalisation from them (see the class
        docstring); returns their raw scores. Distributed callers gather the raw scores from all
        ranks and call ``set_normalization`` themselves."""
        raw = self.raw_scores(input_ids, attention_mask, batch_size=batch_size)
        if reference:
            self.set_reference_normalization(raw)
        else:
            self.set_normalization(raw)
        return raw


@torch.no_grad()
def fold_normalization(head: ScalarHead, gain: torch.Tensor, bias: torch.Tensor) -> ScalarHead:
    """``head`` <- ``gain * head + bias`` (weight scaled by gain, bias ``gain * b + bias``)."""
    lin = head.linear
    g = gain.to(lin.weight.dtype)
    lin.weight.mul_(g)
    lin.bias.mul_(g).add_(bias.to(lin.bias.dtype))
    return head


class Critic(nn.Module):
    """A separate value model: backbone + scalar value head. Zero-initialised head from a plain LM
    (N details #11), or the reward model's head and backbone (N+ and PPO-max: the critic starts
    from the reward model) via ``from_reward_model`` or ``from_pretrained(rm_dir)``. The reward
    normalisation is not part of the critic."""

    def __init__(self, backbone: PreTrainedModel):
        super().__init__()
        self.backbone = backbone
        self.value_head = init_value_head(ScalarHead(hidden_size_of(backbone.config)))
        self.packing = False  # the backbone on packed sequences (models/packing.py); set from ppo.packing

    @classmethod
    def from_reward_model(cls, reward_model: RewardModel) -> "Critic":
        critic = cls(copy.deepcopy(reward_model.backbone))
        critic.value_head.load_state_dict(reward_model.head.state_dict())
        return critic

    @classmethod
    def from_pretrained(
        cls,
        source: Source | PreTrainedModel,
        *,
        dtype: torch.dtype | None = None,
        attn_implementation: str | None = None,
        seed: int | None = None,
        with_normalization: bool = False,
    ) -> "Critic":
        """From a saved critic, a saved reward model or a Hugging Face sequence-classification
        reward model (its trained head becomes the value head: N+ and PPO-max start the critic
        from the reward model), a plain HF LM directory or in-memory model (zero head, N details
        #11), or a config. ``with_normalization``: from an rlhf_fast reward model, fold its
        normalisation into the value head (``gain * head + bias``), so the initial values are the
        normalised per-token rewards, as the N+ TL;DR critic (summarize_from_feedback_details
        ``ScalarModel.forward``: ``scalar_head(h) - config.bias`` with the reward model's
        reference-mean bias); an HF classifier stores no normalisation, so there is none to fold."""
        if isinstance(source, (str, os.PathLike)) and is_sequence_classifier(_local_dir(source)):
            parts = load_hf_reward_parts(source, dtype=dtype, attn_implementation=attn_implementation)
            critic = cls(parts.backbone)
            critic.value_head.load_state_dict(parts.head)
            return critic
        critic = cls(_backbone_from(source, dtype=dtype, attn_implementation=attn_implementation, seed=seed))
        tensors, meta = _extras(source)
        kind = meta.get("kind")
        if kind == "critic":
            critic.value_head.load_state_dict(_io.head_tensors(tensors, "value_head.", source, "critic"))
        elif kind == "reward_model":
            critic.value_head.load_state_dict(_io.head_tensors(tensors, "head.", source, "reward_model"))
            if with_normalization:
                fold_normalization(critic.value_head, tensors["gain"], tensors["bias"])
        elif kind not in (None, "policy"):
            raise ValueError(f"{source}: saved as a {kind!r}; a critic loads from a critic, reward_model, policy or plain LM")
        return critic

    def save_pretrained(self, directory, **hf_kwargs) -> None:
        self.backbone.save_pretrained(directory, **hf_kwargs)
        tensors = {f"value_head.{k}": v for k, v in self.value_head.state_dict().items()}
        _io.save_extras(directory, tensors, {"kind": "critic"})

    @property
    def config(self):
        return self.backbone.config

    def forward(self, input_ids, attention_mask, position_ids=None, *, response_start: Optional[int] = None) -> CriticOutput:
        check_input_ids(input_ids, attention_mask)
        # as RewardModel.forward: a critic started from an HF reward model may lack the pad id's row
        hidden = run_backbone(self.backbone, input_ids.masked_fill(~attention_mask.bool(), 0), attention_mask,
                              position_ids, packing=self.packing)
        values = self.value_head(hidden)
        if response_start is not None:
            values = response_slice(values, response_start)
        return CriticOutput(values=values, hidden=hidden)


def check_reward_tokenizer(reward_model: RewardModel, tokenizer, path=None) -> None:
    """ValueError when ``tokenizer`` (the policy's) would feed ``reward_model`` wrong ids: ids past
    its embedding (the pad token excepted: the reward model never reads it), or, when the reward
    model's directory ``path`` holds a tokenizer, any token whose id differs between the two."""
    what = f"reward model {path}" if path is not None else "reward model"
    pad = getattr(tokenizer, "pad_token_id", None)
    check_vocab_fits(reward_model.backbone, tokenizer, what=what, never_read=(pad,) if pad is not None else ())
    if path is None or not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return
    from transformers import AutoTokenizer

    own = AutoTokenizer.from_pretrained(path, local_files_only=True)
    differ = tokenizer_disagreement(own, tokenizer)
    if differ:
        t = differ[0]
        raise ValueError(
            f"{what}: its tokenizer ({len(own)} tokens) and the policy's ({len(tokenizer)} tokens) disagree on "
            f"{len(differ)} tokens (e.g. {t!r}: id {own.get_vocab()[t]} there, {tokenizer.get_vocab().get(t)} in the "
            "policy's): the reward model would score other text than the policy wrote; use a reward model trained "
            "with the policy's tokenizer")


def load_reward_model(path, tokenizer, *, dtype: torch.dtype | None = None,
                      attn_implementation: str | None = None) -> RewardModel:
    """The frozen reward model PPO scores with: ``RewardModel.from_pretrained(path)`` (rlhf_fast's
    format or an HF sequence-classification directory; anything without a trained reward head is
    a ValueError) checked against the policy's ``tokenizer`` (``check_reward_tokenizer``), in eval
    mode without gradients."""
    rm = RewardModel.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    check_reward_tokenizer(rm, tokenizer, path)
    return rm.eval().requires_grad_(False)


# ---- reward normalisations by name (``rm.normalization``; docs/architecture.md, "Variation points") ----


@dataclass(frozen=True)
class RMNormalization:
    """What ``rm.normalization`` does after training (and before, with ``normalize_before``):
    samples_policy — score fresh samples of the initial policy (lm-human-preferences) instead of
    the SFT data's reference responses (N+); apply(rm, raw_scores) — set gain / bias from the raw
    scores (None: no normalisation)."""

    samples_policy: bool
    apply: Optional[Callable[[RewardModel, torch.Tensor], None]]


RM_NORMALIZATIONS: Registry[RMNormalization] = Registry("reward normalisation")
RM_NORMALIZATIONS.register("policy_samples")(RMNormalization(True, RewardModel.set_normalization))
RM_NORMALIZATIONS.register("reference_mean")(RMNormalization(False, RewardModel.set_reference_normalization))
RM_NORMALIZATIONS.register("reference_std")(RMNormalization(False, RewardModel.set_normalization))
RM_NORMALIZATIONS.register("none")(RMNormalization(False, None))


def rm_normalization_names() -> tuple[str, ...]:
    """The values ``rm.normalization`` accepts."""
    return RM_NORMALIZATIONS.names()
