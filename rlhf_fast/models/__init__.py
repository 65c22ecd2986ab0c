"""rlhf_fast.models."""
