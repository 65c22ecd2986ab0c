"""rlhf_fast.engine."""
