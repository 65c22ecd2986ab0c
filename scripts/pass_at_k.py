#!/usr/bin/env python
"""pass@1 and pass@k of a policy on a multi-turn task's held-out problems (docs/architecture.md,
"Multi-turn episodes"): k episodes per problem against the task's environment, sampled as PPO
samples them (temperature, stop tokens, token budget and turn limit from the preset), each scored
by the environment's last reward (1 = exact answer).

    python scripts/pass_at_k.py runs/calc/sft/model runs/calc/ppo/model --task tiny_calculator --k 8

pass@1 is the mean reward over all k x problems episodes; pass@k is the fraction of problems with
at least one correct episode among their k (the unbiased estimator of Chen et al. 2021 with n = k).
Prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def evaluate(model_dir: str, task: str, k: int, problems: int, seed: int, batch: int, presets=(),
             temperature=None) -> dict:
    from rlhf_fast import config as C
    from rlhf_fast.engine import HybridEngine, SamplingParams
    from rlhf_fast.envs import load_environment
    from rlhf_fast.models import Policy
    from rlhf_fast.tasks import get_task
    from rlhf_fast.trainers.rollout import resolve_stop_tokens

    cfg = C.load_config(presets=[task, *presets]).ppo
    temp = temperature if temperature is not None else cfg.generation.temperature
    t = get_task(task)
    tok = t.tokenizer
    prompts = [r["prompt"] for r in t.prompt_records("eval")][:problems]
    policy = Policy.from_pretrained(model_dir, value_head=False).eval()
    g = cfg.generation
    stops = resolve_stop_tokens(tok, g.stop_tokens)
    eng = HybridEngine(policy, pad_token_id=tok.pad_token_id, max_batch_size=batch, max_seq_len=64 + g.max_new_tokens)
    factory = load_environment(cfg.env)
    rewards = torch.zeros(len(prompts), k)
    t0 = time.perf_counter()
    for s in range(0, len(prompts), max(1, batch // k)):
        chunk = prompts[s : s + max(1, batch // k)]
        rows = [p for p in chunk for _ in range(k)]
        enc = tok(rows, return_tensors="pt", padding=True, add_special_tokens=False)
        params = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=temp,
                                top_k=g.top_k, top_p=g.top_p, eos_token_id=tok.eos_token_id, stop_token_ids=tuple(stops),
                                seed=seed + s)
        out = eng.run_episodes(enc.input_ids, enc.attention_mask, params, envs=[factory() for _ in rows], prompts=rows,
                               encode=lambda x: tok.encode(x, add_special_tokens=False),
                               decode=lambda x: tok.decode(x, skip_special_tokens=False), max_turns=cfg.env_max_turns)
        rewards[s : s + len(chunk)] = out.final_reward.reshape(len(chunk), k)
    correct = rewards > 0.5
    return {"model": model_dir, "task": task, "problems": len(prompts), "k": k, "temperature": temp,
            "pass@1": float(correct.float().mean()), f"pass@{k}": float(correct.any(1).float().mean()),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="model directories (an SFT or PPO stage's model/)")
    ap.add_argument("--task", default="tiny_calculator")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--problems", type=int, default=256, help="held-out problems (the first N)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--batch", type=int, default=256, help="episodes decoded at once")
    ap.add_argument("--preset", action="append", default=[], help="presets after the task's (e.g. grpo: temperature 1)")
    ap.add_argument("--temperature", type=float, default=None, help="default: the presets' generation.temperature")
    args = ap.parse_args()
    for m in args.models:
        print(json.dumps(evaluate(m, args.task, args.k, args.problems, args.seed, args.batch, args.preset,
                                  args.temperature)), flush=True)


if __name__ == "__main__":
    main()
