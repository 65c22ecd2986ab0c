"""Policy / critic / reward-model wrappers over Hugging Face causal LMs: loading (local directories
or configs only, dropout off), heads initialised as in the seeds, padding-aware forward helpers that
return the final hidden state, reward normalisation, and saving in HF format with the heads."""

from rlhf_fast.models.heads import (
    ScalarHead,
    gather_last_valid,
    init_reward_head,
    init_value_head,
    last_valid_index,
    logprobs_from_hidden,
    position_ids_from_mask,
    shifted_labels,
)
from rlhf_fast.models.backbone import backbone_of, hidden_size_of
from rlhf_fast.models.loading import (
    architectures_of,
    check_vocab_fits,
    disable_dropout,
    load_backbone,
    load_causal_lm,
    resize_embeddings_for_tokenizer,
)
from rlhf_fast.models.policy import Policy, PolicyLogProbs, PolicyOutput
from rlhf_fast.models.hf_classifier import HFRewardParts, load_hf_reward_parts
from rlhf_fast.models.reward import (
    Critic,
    CriticOutput,
    RewardModel,
    RewardOutput,
    check_reward_tokenizer,
    load_reward_model,
)

__all__ = [
    "Critic", "CriticOutput", "HFRewardParts", "Policy", "PolicyLogProbs", "PolicyOutput", "RewardModel",
    "RewardOutput", "ScalarHead", "architectures_of", "backbone_of", "check_reward_tokenizer", "check_vocab_fits",
    "disable_dropout", "gather_last_valid", "hidden_size_of", "init_reward_head", "init_value_head", "last_valid_index",
    "load_backbone", "load_causal_lm", "load_hf_reward_parts", "load_reward_model", "logprobs_from_hidden",
    "position_ids_from_mask", "resize_embeddings_for_tokenizer", "shifted_labels",
]
