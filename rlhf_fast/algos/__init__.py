"""rlhf_fast.algos."""
