"""rlhf_fast.trainers."""
