"""Runs the real TRL PPOTrainer (trl 0.25.1, ``trl.PPOTrainer``: ``trl/trainer/ppo_trainer.py``) for a
few iterations and writes per-iteration timings as JSON. Started by ``benchmarks/peer_trl_ppo.py``
with the TRL virtual environment's python (``/work/trlvenv/bin/python``); imported by nothing else,
never collected by pytest (no ``test_`` / ``bench_`` name) and never run in CI.

    python trl_ppo_runner.py SPEC.json OUT.json

SPEC (written by peer_trl_ppo.py): policy_dir, reward_dir (an AutoModelForSequenceClassification
directory with num_labels 1; the value model is a second copy of it: critic from the RM), prompts
(a JSONL of {"prompt"}), batch, resp_len, minibatches, epochs, iters, threads, temperature, kl_coef,
lr, adam_eps, seed, missing_eos_penalty, work_dir; optional trl_optim (PPOConfig.optim).

Timing hooks (no TRL code is changed; the train loop is TRL's own):
  iteration  between consecutive ``on_step_end`` callbacks (the first from ``on_train_begin``): the
             whole loop body of ``PPOTrainer.train``, gc.collect() and stats included
  generate   the wall time of ``batch_generation`` (HF ``generate`` with output_scores)
  rollout    iteration start -> the first ``accelerator.accumulate`` of the update: dataloader,
             generation, old log-probs from the generation logits, reference forward, value and
             reward forwards, GAE loop, whitening
  update     the first ``accelerator.accumulate`` -> ``on_step_end``: epochs x minibatches of
             forward / backward / AdamW step, then TRL's metrics and ``self.log``
  phases     inside those: ``forward`` (ppo_trainer's ``forward``: the reference forward in the rollout,
             the policy + value forward in the update), ``get_reward`` (value and reward model forwards),
             ``gc`` (TRL's ``gc.collect()`` calls; those after ``on_step_end`` count in the next rollout)
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    import trl
    import trl.trainer.ppo_trainer as ppo_mod
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl import PPOConfig, PPOTrainer

    t_load = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(spec["policy_dir"])
    tok.padding_side = "left"  # TRL's queries are left-padded (DataCollatorWithPadding pads on this side)
    prompts = [json.loads(ln)["prompt"] for ln in open(spec["prompts"]) if ln.strip()]
    ids = [tok(p)["input_ids"] for p in prompts]
    train = Dataset.from_dict({"input_ids": ids})
    evald = Dataset.from_dict({"input_ids": ids[: spec["batch"]]})
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1, dtype=torch.float32)

    B, nmb = spec["batch"], spec["minibatches"]
    args = PPOConfig(
        output_dir=os.path.join(spec["work_dir"], "trl_out"),
        # trl 0.25.1: local_batch_size = per_device_train_batch_size * gradient_accumulation_steps (the
        # minibatch count no longer multiplies it), local_mini_batch_size = local_batch_size / num_mini_batches,
        # and each minibatch is cut into slices of per_device_train_batch_size: per_device = B, one accumulation
        # step, gives B rollouts per iteration, nmb minibatches of B / nmb rows, one optimizer step each,
        # micro-batch = minibatch (rlhf_fast: ppo.algo.micro_batch_size None)
        per_device_train_batch_size=B,
        gradient_accumulation_steps=1,
        num_mini_batches=nmb,
        num_ppo_epochs=spec["epochs"],
        total_episodes=spec["iters"] * B,
        local_rollout_forward_batch_size=max(64, B),  # TRL's default 64 >= B: one chunk
        response_length=spec["resp_len"],
        stop_token="eos",
        temperature=spec["temperature"],
        kl_coef=spec["kl_coef"],
        kl_estimator="k1",
        missing_eos_penalty=spec["missing_eos_penalty"],
        learning_rate=spec["lr"],
        adam_epsilon=spec["adam_eps"],
        lr_scheduler_type="linear",
        # OnPolicyConfig's default is bf16 = not fp16 (mixed precision: accelerate's autocast over fp32
        # weights); --precision fp32 turns it off (as rlhf_fast's default), bf16 keeps TRL's default
        bf16=spec.get("precision", "fp32") == "bf16",
        fp16=False,
        gradient_checkpointing=False,  # PPOTrainer.train never turns it on; explicit anyway
        num_sample_generations=0,  # no periodic sample generation inside the timed loop
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=spec["seed"],
        use_cpu=True,
        dataloader_num_workers=0,
        # TRL's optimizer is transformers' default (torch >= 2.8: "adamw_torch_fused", one fused kernel per
        # step, also on a CPU) unless the spec names another ("adamw_torch": torch's per-tensor loop, the
        # AdamW rlhf_fast steps with on a CPU): peer_trl_ppo.py / peer_trl_grid.py --trl-optim
        **({"optim": spec["trl_optim"]} if spec.get("trl_optim") else {}),
    )

    marks: list[dict] = []
    cur: dict = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            cur.clear()
            cur["start"] = time.perf_counter()

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            upd0 = cur.get("t_update", now)
            marks.append({"iteration_s": now - cur["start"], "rollout_s": upd0 - cur["start"],
                          "update_s": now - upd0, "generate_s": cur.get("generate_s", 0.0),
                          "resp_len_max": cur.get("resp_len_max"),
                          "phases": {k[:-2]: v for k, v in cur.items() if k.startswith(("rollout_", "update_"))}})
            cur.clear()
            cur["start"] = now

    orig_gen = ppo_mod.batch_generation

    def timed_generation(model, queries, *a, **k):
        t0 = time.perf_counter()
        out = orig_gen(model, queries, *a, **k)
        cur["generate_s"] = cur.get("generate_s", 0.0) + time.perf_counter() - t0
        cur["resp_len_max"] = int(out[0].shape[1] - queries.shape[1])  # TRL trims to the longest response
        return out

    ppo_mod.batch_generation = timed_generation  # PPOTrainer.train looks it up in its module

    def timed(name, fn):
        """Wall time of ``fn`` summed into the current iteration, rollout and update apart."""

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            key = f"{'update' if 't_update' in cur else 'rollout'}_{name}_s"
            cur[key] = cur.get(key, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    # finer phases, looked up in ppo_trainer's module too: the reference / policy forwards, the value and
    # reward forwards (get_reward), and TRL's gc.collect() calls (two per iteration)
    ppo_mod.forward = timed("forward", ppo_mod.forward)
    ppo_mod.get_reward = timed("get_reward", ppo_mod.get_reward)

    class _TimedGC:
        collect = staticmethod(timed("gc", __import__("gc").collect))

    ppo_mod.gc = _TimedGC

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=train, value_model=value, eval_dataset=evald, callbacks=[Clock()])
    orig_acc = trainer.accelerator.accumulate

    def timed_accumulate(*models):
        cur.setdefault("t_update", time.perf_counter())
        return orig_acc(*models)

    trainer.accelerator.accumulate = timed_accumulate
    load_s = time.perf_counter() - t_load
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    inner_opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper holds torch's
    out = {"impl": "trl", "iterations": marks, "load_s": load_s, "train_s": train_s,
           "gc_tracked_objects": len(__import__("gc").get_objects()),  # what each gc.collect() walks
           "peak_rss_mb_self": rss_kb / 1024, "torch_threads": torch.get_num_threads(),
           "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "trl": trl.__version__,
                        "transformers": transformers.__version__,
                        "accelerate": __import__("accelerate").__version__,
                        "datasets": __import__("datasets").__version__},
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "optimizer": {"optim": str(args.optim), "class": type(inner_opt).__name__,
                         "defaults": {k: str(v) for k, v in getattr(inner_opt, "defaults", {}).items()}},
           "params": {"policy": sum(p.numel() for p in policy.parameters()),
                      "value": sum(p.numel() for p in value.parameters())},
           "log_history": trainer.state.log_history}
    json.dump(out, open(out_path, "w"), indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
