"""The main job: SFT -> reward model -> PPO on one config, then a summary.

    rlhf-fast pipeline --output-dir runs/demo          # the built-in task, nothing downloaded
    rlhf-fast pipeline --task tiny_arithmetic --preset grpo   # a checked reward: SFT -> GRPO, no reward model

With ``ppo.reward.function`` set (a verifiable task's checker, ``task:gold``, or a user's
function) the reward-model stage is skipped.

Layout: DIR/sft, DIR/rm, DIR/ppo (each a stage directory: metrics.jsonl, tensorboard/,
checkpoints/, model/), DIR/ppo/plots/*.png, and DIR/summary.json with at least
``sft_gold_score``, ``ppo_gold_score``, ``final_kl`` and ``seconds``. ``resume=True`` skips the
stages whose ``model/`` exists and resumes the interrupted one from its checkpoint.

The gold scores are the built-in task's hidden reward of samples on the held-out prompts, taken
with the PPO sampling settings: before PPO (the SFT policy, PPO's evaluation at iteration 0) and
after the last iteration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from rlhf_fast.config import RunConfig
from rlhf_fast.trainers import deepspeed_setup as dss
from rlhf_fast.trainers.common import _atomic_write_text, read_metrics


def _done(stage_dir: Path) -> bool:
    return (stage_dir / "model" / "config.json").is_file()


def run_pipeline(cfg: RunConfig, output_dir, *, resume: bool = False, echo=print) -> dict:
    from rlhf_fast.trainers.ppo import PPOTrainer
    from rlhf_fast.trainers.rm import RMTrainer
    from rlhf_fast.trainers.sft import SFTTrainer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dist = dss.init_distributed(cfg.sft.deepspeed.backend)
    t0 = time.perf_counter()
    seconds = {}
    sft_dir, rm_dir, ppo_dir = out / "sft", out / "rm", out / "ppo"

    t = time.perf_counter()
    if not (resume and _done(sft_dir)):
        echo(f"[pipeline] 1/3 SFT -> {sft_dir}")
        SFTTrainer(cfg.sft, sft_dir, resume=resume, dist_info=dist).fit()
    seconds["sft"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg.rm.sft_model = cfg.rm.sft_model or str(sft_dir / "model")
    if cfg.ppo.reward.function is not None:  # a checked (verifiable) reward or a user's function: no reward model
        echo(f"[pipeline] 2/3 no reward model: PPO is scored by {cfg.ppo.reward.function}")
    elif not (resume and _done(rm_dir)):
        echo(f"[pipeline] 2/3 reward model from {cfg.rm.sft_model} -> {rm_dir}")
        RMTrainer(cfg.rm, rm_dir, resume=resume, reference_data=cfg.sft.data, dist_info=dist,
                  policy_temperature=cfg.ppo.generation.temperature).fit()
    seconds["rm"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg.ppo.policy.path = cfg.ppo.policy.path or str(sft_dir / "model")
    if cfg.ppo.reward.function is None:
        cfg.ppo.reward.model_path = cfg.ppo.reward.model_path or str(rm_dir / "model")
    echo(f"[pipeline] 3/3 PPO from {cfg.ppo.policy.path} with {cfg.ppo.reward.model_path or cfg.ppo.reward.function}"
         f" -> {ppo_dir}")
    PPOTrainer(cfg.ppo, ppo_dir, resume=resume, dist_info=dist).fit()
    seconds["ppo"] = time.perf_counter() - t

    summary = summarize(out, seconds=time.perf_counter() - t0, stage_seconds=seconds,
                        planned_iterations=cfg.ppo.iterations)
    summary["gold_metric"] = _gold_metric(cfg)
    summary["reward"] = cfg.ppo.reward.function  # None: the reward model
    if dist.is_main:
        _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        echo(format_summary(summary))
    dss.barrier()
    return summary


def _gold_metric(cfg: RunConfig) -> str:
    """What the gold score is: the built-in task's ``gold_metric`` ("exact-match accuracy" for
    tiny_arithmetic), or "gold score"."""
    if cfg.ppo.data.train_file is not None:
        return "gold score"
    from rlhf_fast.tasks import TASKS

    return getattr(TASKS.get(cfg.ppo.data.task), "gold_metric", "gold score")


def summarize(out: Path, *, seconds: float, stage_seconds: dict, planned_iterations: Optional[int] = None) -> dict:
    """summary.json from the stages' metrics.jsonl files."""
    ppo = read_metrics(out / "ppo")
    evals = [r for r in ppo if "eval/score" in r]
    first, last = (evals[0], evals[-1]) if evals else ({}, {})
    rm_rows = [r for r in read_metrics(out / "rm") if "eval/accuracy" in r]
    sft_rows = [r for r in read_metrics(out / "sft") if "eval/loss" in r]
    train_rows = [r for r in ppo if "objective/kl" in r]
    return {
        "sft_gold_score": first.get("eval/gold_score"),
        "ppo_gold_score": last.get("eval/gold_score"),
        "sft_rm_score": first.get("eval/score"),
        "ppo_rm_score": last.get("eval/score"),
        "final_kl": last.get("eval/kl"),
        "final_train_kl": train_rows[-1]["objective/kl"] if train_rows else None,
        "rm_eval_accuracy": rm_rows[-1]["eval/accuracy"] if rm_rows else None,
        "sft_eval_loss": sft_rows[-1]["eval/loss"] if sft_rows else None,
        "ppo_iterations": train_rows[-1]["step"] if train_rows else 0,
        "ppo_iterations_planned": planned_iterations,
        "ppo_eval_iteration": last.get("step"),
        "seconds": round(seconds, 1),
        "stage_seconds": {k: round(v, 1) for k, v in stage_seconds.items()},
        "plots": sorted(str(p.relative_to(out)) for p in (out / "ppo" / "plots").glob("*.png")),
    }


def format_summary(s: dict) -> str:
    def f(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    rows = [
        (f"{s.get('gold_metric', 'gold score')} (held-out prompts)", f(s["sft_gold_score"]), f(s["ppo_gold_score"])),
        (f"score ({s['reward']})" if s.get("reward") else "reward-model score",
         f(s["sft_rm_score"]), f(s["ppo_rm_score"])),
        ("KL to the SFT policy (nats/seq)", "0", f(s["final_kl"])),
    ]
    w = max(len(r[0]) for r in rows)
    lines = ["", f"{'':{w}}  {'SFT':>8}  {'PPO':>8}"]
    lines += [f"{a:{w}}  {b:>8}  {c:>8}" for a, b, c in rows]
    n, planned = s["ppo_iterations"], s.get("ppo_iterations_planned")
    if planned is not None and n < planned:  # a stop_after_iterations run: say so, and which eval the column is
        lines.append(f"STOPPED EARLY after {n} of {planned} PPO iterations: the PPO column is the evaluation "
                     f"at iteration {s.get('ppo_eval_iteration')}")
    lines.append(f"reward-model eval accuracy {f(s['rm_eval_accuracy'])}; {s['ppo_iterations']} PPO iterations; "
                 f"{s['seconds']:.0f} s (sft {s['stage_seconds'].get('sft', 0):.0f}, rm {s['stage_seconds'].get('rm', 0):.0f}, "
                 f"ppo {s['stage_seconds'].get('ppo', 0):.0f})")
    return "\n".join(lines)
