"""rlhf_fast.data."""
