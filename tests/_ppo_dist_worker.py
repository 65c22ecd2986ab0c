"""One PPO run of the tiny test setup, launched by tests/test_ppo_distributed.py under torchrun
(or a single process): greedy rollouts (deterministic per row, whatever the split over ranks),
the task's gold reward, ZeRO stage from argv. Writes DIR/model and DIR/metrics.jsonl.

    torchrun --nproc_per_node 2 tests/_ppo_dist_worker.py OUT_DIR ZERO_STAGE [USE_LINEAR_LOGPROBS [LORA_RANK [PACKING]]]

PACKING: "true" / "false" sets ppo.packing (default: the config's default); MAX_TOKENS (after it):
ppo.algo.max_tokens_per_micro_batch. Arguments after a "--" are further config overrides.
"""

import sys

from rlhf_fast import config as C
from rlhf_fast.trainers.ppo import PPOTrainer

OVERRIDES = [
    "--ppo.policy.size", "test", "--ppo.reward.function", "task:gold", "--ppo.iterations", "2",
    "--ppo.rollout_batch_size", "8", "--ppo.generation.max_new_tokens", "6", "--ppo.generation.do_sample", "false",
    "--ppo.eval_prompts", "4", "--ppo.logging.eval_every", "0", "--ppo.logging.progress_bar", "false",
    "--ppo.logging.tensorboard", "false", "--ppo.algo.num_minibatches", "2", "--ppo.algo.num_epochs", "2",
    "--ppo.algo.micro_batch_size", "2", "--ppo.critic", "separate", "--ppo.optim.lr", "1e-3",
    "--ppo.critic_optim.lr", "1e-3", "--ppo.algo.max_grad_norm", "1.0",
]

if __name__ == "__main__":
    extra = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else []
    sys.argv = sys.argv[: sys.argv.index("--")] if "--" in sys.argv else sys.argv
    out, stage = sys.argv[1], sys.argv[2]
    linear = sys.argv[3] if len(sys.argv) > 3 else "false"
    rank = sys.argv[4] if len(sys.argv) > 4 else "0"
    packing = ["--ppo.packing", sys.argv[5]] if len(sys.argv) > 5 else []
    if len(sys.argv) > 6:
        packing += ["--ppo.algo.max_tokens_per_micro_batch", sys.argv[6]]
    cfg = C.load_config(overrides=[*OVERRIDES, "--ppo.deepspeed.zero_stage", stage,
                                   "--ppo.use_linear_logprobs", linear, "--ppo.lora.rank", rank,
                                   "--ppo.critic_lora.rank", rank, *packing, *extra]).ppo
    trainer = PPOTrainer(cfg, out)
    trainer.fit()
    # how much of the frozen reference this rank holds (ZeRO-3 inference partitions it)
    import json
    import os

    held = sum(p.numel() for p in trainer.ref_policy.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.ref_policy.parameters())
    with open(os.path.join(out, f"ref_params_rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        policy = trainer.policy_engine.module
        own = {p.untyped_storage().data_ptr() for p in policy.parameters()}
        ref_own = {p.untyped_storage().data_ptr() for p in trainer.ref_policy.parameters()} - own
        json.dump({"held": held, "full": full, "ref_own_storages": len(ref_own),
                   "frozen_engines": len(trainer.frozen_engines)}, f)
