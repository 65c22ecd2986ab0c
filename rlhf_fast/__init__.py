"""rlhf_fast: RLHF + PPO with fused kernels, a hybrid generation engine and a DeepSpeed PPO loop."""

__version__ = "0.1.0"
