"""The named config presets (``--preset NAME``, ``--task NAME``): dotted paths and their values, each
preset with the paper or upstream file its values come from."""

from __future__ import annotations

import dataclasses
from typing import Any

from rlhf_fast.algos.hparams import PRESETS as PPO_PRESETS

PRESETS: dict[str, dict[str, Any]] = {
    "ci": {
        # The built-in task on 2 CPU cores: SFT a narrow 2-layer model for ~40 s, then an RM from it
        # that passes 0.75 held-out accuracy (tests/test_sft_rm.py times it).
        "sft.model.config_overrides": {"n_embd": 128, "n_layer": 2, "n_inner": 384},
        "sft.epochs": 1.0, "sft.max_steps": 100, "sft.batch_size": 64, "sft.micro_batch_size": 64,
        "sft.optim.lr": 2e-3, "sft.data.max_train_examples": 6400, "sft.data.max_eval_examples": 256,
        "rm.max_steps": 120, "rm.batch_size": 64, "rm.micro_batch_size": 64, "rm.optim.lr": 5e-4,
        "rm.scheduler.warmup_steps": 5, "rm.data.max_eval_examples": 512, "rm.normalization_samples": 128,
        "sft.logging.log_every": 10, "rm.logging.log_every": 10,
    },
    "n_details": {
        # "The N Implementation Details of RLHF with PPO": RM 1 epoch, lr annealed linearly to 0
        # (#5), TF-style Adam epsilon, normalisation on samples of the initial policy before and
        # after training (#9: the loss trains on the before-normalised scores).
        "rm.epochs": 1.0, "rm.scheduler.decay": "linear", "rm.scheduler.min_lr_ratio": 0.0,
        "rm.optim.tf_adam_eps": True, "rm.normalization": "policy_samples", "rm.normalize_before": True,
        "rm.sample_temperature": 0.7,  # lm-human-preferences' books / TL;DR policy temperature
        "rm.normalization_samples": 256,  # launch.py get_train_reward_experiments: normalize_samples 256
        "rm.sample_stop_at_eos": False,  # train_reward.py samples response_length tokens, EOS ignored
        "sft.optim.tf_adam_eps": True,
    },
    "n_plus": {
        # "The N+ Implementation Details ... TL;DR": one lr 3e-6, AdamW eps 1e-5, SFT 1 epoch on
        # query + summary with a cosine schedule, ZeRO-2, RM from SFT with reference-mean normalisation.
        "sft.optim.lr": 3e-6, "rm.optim.lr": 3e-6, "sft.optim.eps": 1e-5, "rm.optim.eps": 1e-5,
        "sft.epochs": 1.0, "sft.loss_on": "all", "sft.scheduler.decay": "cosine", "rm.epochs": 1.0,
        "sft.deepspeed.zero_stage": 2, "rm.deepspeed.zero_stage": 2, "rm.normalization": "reference_mean",
        # sft.py / reward.py at ee77a9a: optim.AdamW(model.parameters(), lr, eps) keeps torch's default
        # weight decay 0.01; reward.py's scheduler defaults to "cosine" (sbatches/reward.sbatch keeps it)
        "sft.optim.weight_decay": 0.01, "rm.optim.weight_decay": 0.01, "rm.scheduler.decay": "cosine",
        # N+ does not normalise before training; stated so that n_plus after a preset that does
        # (lm_human_preferences, n_details) wins cleanly instead of leaving an invalid mix
        "rm.normalize_before": False,
    },
}


def _ppo_preset(name: str, **extra) -> dict[str, Any]:
    """A PPO paper preset: every ``algo`` field of ``rlhf_fast.algos.PRESETS[name]`` plus the
    generation / model settings the paper pairs with it."""
    algo = {f"ppo.algo.{k}": v for k, v in dataclasses.asdict(PPO_PRESETS[name]).items()}
    return {**algo, **extra}


PRESETS.update({
    # "The N Implementation Details of RLHF with PPO" (openai/lm-human-preferences train_policy.py,
    # launch.py's books tasks; vwxyzjn/lm-human-preference-details train_policy_accelerate.py): fixed-length
    # responses with EOS ignored (#4), truncation at the first '.' at or after token 16 and a
    # -1 score without one (#14), temperature 0.7 in sampling and log-probs (#10), a zero-init
    # value head on the policy (#11), adaptive KL (#20), TF-style Adam eps; the reward model
    # normalised on samples of the initial policy before and after its training (#9). PPO updates
    # equal upstream's (tests/test_preset_parity.py, scripts/check_preset_parity.py). Deviations:
    # README "Presets and their sources".
    "lm_human_preferences": _ppo_preset(
        "lm_human_preferences", **{
            "rm.normalization": "policy_samples", "rm.normalize_before": True, "rm.normalization_samples": 256,
            "rm.sample_stop_at_eos": False,
            "ppo.generation.stop_at_eos": False, "ppo.generation.stop_tokens": ["."],
            "ppo.generation.stop_during_generation": False, "ppo.generation.truncate_min_length": 16,
            "ppo.generation.missing_stop_penalty": "replace", "ppo.generation.missing_stop_value": -1.0,
            "ppo.generation.temperature": 0.7, "ppo.generation.top_k": 0, "ppo.generation.top_p": 1.0,
            "ppo.critic": "value_head", "ppo.optim.tf_adam_eps": True, "ppo.scheduler.decay": "linear",
            "ppo.scheduler.warmup_steps": 0, "ppo.scheduler.warmup_ratio": 0.0, "ppo.scheduler.min_lr_ratio": 0.0,
            # the '.' only truncates the scored copy; PPO trains on all 24 sampled tokens and the
            # score lands on the last one (train_policy.py make_score_fn / compute_rewards / loss)
            "ppo.generation.after_stop": "trained",
            # lrnow = lr * (1 - global_step / nupdates), the global step advancing once per PPO update
            "ppo.lr_schedule_unit": "iteration",
        }),
    # "The N+ Implementation Details ... TL;DR" (vwxyzjn/summarize_from_feedback_details ee77a9a
    # ppo.py, as sbatches/ppo.sbatch launches it for pythia-1b-deduped: 8 ranks, 16 rows per micro-
    # batch, 4 accumulation steps): EOS trick with -1 for a missing EOS, beta 0.05, temperature 0.7,
    # critic from the reward model, the score one token past the EOS, the loss per micro-batch, AdamW
    # weight decay 0.01, the lr annealed once per update. The PPO defaults differ where the project
    # prefers otherwise (README "Presets and their sources"); the preset pins every field (it undoes
    # another preset given before it). PPO updates equal the source's
    # (tests/test_preset_parity_sources.py, scripts/check_preset_parity.py). N+'s model-size settings (lr 3e-6, ZeRO-2, for 1B-6.9B models) are
    # not set: at the built-in task's size lr 3e-6 does not train in 40 iterations. Add
    # --ppo.optim.lr 3e-6 --ppo.deepspeed.zero_stage 2 for them. Deviations: README "Presets and
    # their sources".
    "tldr": _ppo_preset(
        "tldr", **{
            "ppo.generation.stop_at_eos": True, "ppo.generation.missing_stop_penalty": "replace",
            "ppo.generation.missing_stop_value": -1.0, "ppo.generation.temperature": 0.7, "ppo.critic": "separate",
            "ppo.critic_with_rm_normalization": True, "ppo.generation.stop_tokens": [], "ppo.generation.truncate_min_length": 0,
            "ppo.generation.top_k": 0, "ppo.generation.top_p": 1.0,
            # tokens after the EOS padded and masked (ppo.py: padding_mask, INVALID_LOGPROB)
            "ppo.generation.after_stop": "masked",
            # lr set once per update: frac = 1 - (update - 1) / num_updates (ppo.py), AdamW eps 1e-5
            "ppo.lr_schedule_unit": "iteration", "ppo.scheduler.decay": "linear", "ppo.scheduler.warmup_steps": 0,
            "ppo.scheduler.warmup_ratio": 0.0, "ppo.scheduler.min_lr_ratio": 0.0, "ppo.optim.tf_adam_eps": False,
            "ppo.optim.eps": 1e-5,
            # one optim.AdamW(model.parameters(), lr, eps) over policy and critic: torch's default
            # weight decay 0.01 on every parameter, the critic at the policy's lr and eps
            "ppo.optim.weight_decay": 0.01, "ppo.critic_optim.weight_decay": 0.01, "ppo.critic_optim.eps": 1e-5,
            "ppo.critic_optim.betas": [0.9, 0.999], "ppo.critic_optim.tf_adam_eps": False, "ppo.critic_lr_ratio": 1.0,
            "ppo.critic_head_bias": True,
            # the loss: each micro-batch's token mean (masked_mean), averaged over the 4 accumulation
            # steps x 8 ranks of sbatches/ppo.sbatch's 1B launch (local_micro_batch_size 16)
            "ppo.algo.loss_group_rows": 16,
            # score and value target one token past the EOS (sequence_lengths_p1, padding_mask_p1)
            "ppo.algo.score_position": "after_stop", "ppo.algo.joint_grad_clip": False,
            # the reward model subtracts the mean score of the SFT data's reference summaries
            # (reward.py: scalar_model_config.bias); no normalisation before training
            "rm.normalization": "reference_mean", "rm.normalize_before": False,
        }),
    # "Secrets of RLHF, Part I" PPO-max as OpenLMLab/MOSS-RLHF's (4865d82) train_ppo_en.sh runs it
    # (7 ranks, 2 rows each; PPO updates equal the source's: tests/test_preset_parity_sources.py): running reward
    # scaling, small fixed beta, value and policy loss clipping, critic from the reward model,
    # samples at 0.8 / top-p 0.9 stopped at the EOS but log-probs from raw logits; AdamW betas
    # (0.9, 0.95), eps 1e-6 for the policy and 1e-8 for the critic (ppo_trainer.build_optimizer).
    # Its repetition penalty 1.1 is not reproduced (README table).
    "ppo_max": _ppo_preset(
        "ppo_max", **{
            "ppo.generation.temperature": 0.8, "ppo.generation.top_p": 0.9, "ppo.generation.top_k": 0,
            "ppo.generation.missing_stop_penalty": None, "ppo.generation.stop_at_eos": True,
            "ppo.generation.stop_tokens": [], "ppo.generation.truncate_min_length": 0,
            # MOSS-RLHF scores log-probs from the raw logits (temperature 1, no top-p) although it
            # samples at 0.8 / top-p 0.9: reproduced as is (its ratio compares two distributions)
            "ppo.algo.top_k": 0, "ppo.algo.top_p": 1.0,
            "ppo.generation.after_stop": "masked", "ppo.critic": "separate", "ppo.critic_with_rm_normalization": False,
            "ppo.optim.betas": [0.9, 0.95], "ppo.optim.eps": 1e-6, "ppo.optim.tf_adam_eps": False,
            "ppo.critic_optim.betas": [0.9, 0.95], "ppo.critic_optim.eps": 1e-8, "ppo.critic_optim.tf_adam_eps": False,
            # invsqrt_scheduler, stepped after every optimizer step; train_ppo_en.sh warms up for 100 of
            # its 1000 steps: a tenth of the run here
            "ppo.lr_schedule_unit": "optimizer_step", "ppo.scheduler.decay": "invsqrt",
            "ppo.scheduler.warmup_steps": 0, "ppo.scheduler.warmup_ratio": 0.1, "ppo.scheduler.min_lr_ratio": 0.0,
            # build_optimizer: weight decay 0 in every group; critic_lr 1.5e-6 = 3 x lr 5e-7; the
            # critic head has no bias (train_ppo.py LlamaRewardModel)
            "ppo.optim.weight_decay": 0.0, "ppo.critic_optim.weight_decay": 0.0, "ppo.critic_lr_ratio": 3.0,
            "ppo.critic_head_bias": False,
            # criterion: a token mean over each rank's batch_size 2 rows, DeepSpeed averaging the 7
            # ranks; one gradient_clipping over the engine that holds policy and critic
            "ppo.algo.loss_group_rows": 2, "ppo.algo.joint_grad_clip": True, "ppo.algo.score_position": "stop",
            # PPO scores with the reward head as trained: no normalisation (train_rm.py sets none)
            "rm.normalization": "none", "rm.normalize_before": False,
        }),
})
PRESETS["ci"].update({
    # PPO on the built-in task inside the CI budget (the pipeline test): a few dozen iterations.
    "ppo.iterations": 30, "ppo.rollout_batch_size": 32, "ppo.eval_prompts": 64, "ppo.logging.eval_every": 10,
    "ppo.algo.num_epochs": 2, "ppo.algo.num_minibatches": 2, "ppo.optim.lr": 5e-4, "ppo.critic_optim.lr": 5e-4,
    "ppo.generation.max_new_tokens": 20,
})

# ---- the critic-free family and the built-in tasks (``algos/critic_free.py``, ``rlhf_fast/tasks``) --
# Each RL preset: every ``algo`` field of ``rlhf_fast.algos.PRESETS[name]``, groups of 8 samples
# per prompt (TRL ``num_generations`` 8) at temperature 1 (TRL, verl and OpenRLHF sample at 1.0 in
# their GRPO / DAPO / REINFORCE++ recipes), no critic (the estimators need no values).
_GROUPS = {"ppo.samples_per_prompt": 8, "ppo.generation.temperature": 1.0, "ppo.generation.top_k": 0,
           "ppo.generation.top_p": 1.0}
PRESETS.update({
    "grpo": _ppo_preset("grpo", **_GROUPS),
    "dr_grpo": _ppo_preset("dr_grpo", **_GROUPS),
    "dapo": _ppo_preset("dapo", **_GROUPS),
    # RLOO: TRL RLOOConfig rloo_k 2... its paper's best k is 4; groups of 4
    "rloo": _ppo_preset("rloo", **{**_GROUPS, "ppo.samples_per_prompt": 4}),
    # REINFORCE++ needs no groups (one sample per prompt, OpenRLHF n_samples_per_prompt 1)
    "reinforce_pp": _ppo_preset("reinforce_pp", **{**_GROUPS, "ppo.samples_per_prompt": 1}),
    "reinforce_pp_baseline": _ppo_preset("reinforce_pp_baseline", **_GROUPS),
    "gspo": _ppo_preset("gspo", **_GROUPS),
    # ``--task tiny_sentiment`` (the default task) and ``--task tiny_arithmetic``: the built-in
    # tasks, applied before every other preset. tiny_arithmetic's reward is checked, not learned:
    # PPO is scored by the task's checker and the pipeline trains no reward model. Its model is
    # the narrow 2-layer one of "ci"; 800 SFT steps (1-2 min on 2 loaded cores) on demonstrations with
    # 30% off-by-one slips reach 0.25 of the held-out sums sampled at temperature 1 (0.41 greedy).
    "tiny_sentiment": {"sft.data.task": "tiny_sentiment", "rm.data.task": "tiny_sentiment",
                       "ppo.data.task": "tiny_sentiment"},
    "tiny_arithmetic": {
        "sft.data.task": "tiny_arithmetic", "rm.data.task": "tiny_arithmetic", "ppo.data.task": "tiny_arithmetic",
        "ppo.reward.function": "task:gold", "ppo.reward.model_path": None,
        "sft.model.config_overrides": {"n_embd": 128, "n_layer": 2, "n_inner": 384},
        "sft.epochs": 1.0, "sft.max_steps": 800, "sft.batch_size": 64, "sft.micro_batch_size": 64,
        "sft.optim.lr": 2e-3, "sft.logging.log_every": 10, "sft.data.max_eval_examples": 256,
        "ppo.generation.max_new_tokens": 6, "ppo.generation.missing_stop_penalty": None,
        # RL: 64 prompts per iteration (x samples_per_prompt), lr 2e-4 after 10 warm-up steps (5e-4 and
        # more without warm-up wrecked the SFT policy in a few steps; 3e-5 hardly moved it), 180 iterations
        "ppo.iterations": 180, "ppo.rollout_batch_size": 64, "ppo.eval_prompts": 512, "ppo.logging.eval_every": 20,
        "ppo.optim.lr": 2e-4, "ppo.scheduler.warmup_steps": 10,
    },
    # ``--task tiny_calculator``: multi-turn episodes with a calculator tool (docs/architecture.md,
    # "Multi-turn episodes"). The environment scores PPO (no reward model); a model turn ends at
    # "</calc>" (a tool call, answered by the environment) or EOS (the final answer); 48 tokens per
    # episode (a correct 3-step episode takes at most ~36). A short SFT stage on 1-2 step problems,
    # RL and evaluation on 2-3 step ones.
    "tiny_calculator": {
        "sft.data.task": "tiny_calculator", "rm.data.task": "tiny_calculator", "ppo.data.task": "tiny_calculator",
        "ppo.env": "tiny_calculator", "ppo.env_max_turns": 6,
        "ppo.reward.function": None, "ppo.reward.model_path": None,
        "sft.model.config_overrides": {"n_embd": 128, "n_layer": 2, "n_inner": 384},
        "sft.epochs": 1.0, "sft.max_steps": 300, "sft.batch_size": 64, "sft.micro_batch_size": 64,
        "sft.optim.lr": 2e-3, "sft.logging.log_every": 10, "sft.data.max_eval_examples": 256,
        "ppo.generation.max_new_tokens": 48, "ppo.generation.stop_tokens": ["</calc>"],
        "ppo.generation.missing_stop_penalty": None,
        "ppo.iterations": 100, "ppo.rollout_batch_size": 32, "ppo.eval_prompts": 256, "ppo.logging.eval_every": 20,
        "ppo.optim.lr": 2e-4, "ppo.scheduler.warmup_steps": 10,
    },
})
