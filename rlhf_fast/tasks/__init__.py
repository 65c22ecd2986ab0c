"""rlhf_fast.tasks."""
