"""The main job: SFT -> reward model -> PPO on one config, then a summary.

    rlhf-fast pipeline --output-dir runs/demo          # the built-in task, nothing downloaded
    rlhf-fast pipeline --task tiny_arithmetic --preset grpo   # a checked reward: SFT -> GRPO, no reward model

With ``ppo.reward.function`` set (a verifiable task's checker, ``task:gold``, or a user's
function) the reward-model stage is skipped.

Layout: DIR/sft, DIR/rm, DIR/ppo (each a stage directory: metrics.jsonl, tensorboard/,
checkpoints/, model/), DIR/ppo/plots/*.png, and DIR/summary.json with at least
``sft_gold_score``, ``ppo_gold_score``, ``final_kl`` and ``seconds``. ``resume=True`` skips the
stages whose ``model/`` exists and resumes the interrupted one from its checkpoint; a stage whose
settings changed since its run is refused (before anything trains), as a stage's own ``--resume``
refuses them. Without ``resume``, a directory holding a previous pipeline run is refused unless
``overwrite=True`` (then each stage deletes its own earlier run). ``DIR`` is locked against a second
pipeline (``rlhf_fast.trainers.run.guard.OutputDirLock``), and each stage locks its own directory.

The gold scores are the built-in task's hidden reward of samples on the held-out prompts, taken
with the PPO sampling settings: before PPO (the SFT policy, PPO's evaluation at iteration 0) and
after the last iteration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from rlhf_fast import config as config_mod
from rlhf_fast.config import RunConfig
from rlhf_fast.trainers import deepspeed_setup as dss
from rlhf_fast.trainers.run.atomic_files import atomic_write_text
from rlhf_fast.trainers.run.checkpoints import STATE_FILE, check_resume_config, latest_checkpoint
from rlhf_fast.trainers.run.guard import OutputDirLock, previous_run, start_together
from rlhf_fast.trainers.run.metrics_log import read_metrics

STAGES = ("sft", "rm", "ppo")


def _done(stage_dir: Path) -> bool:
    model = stage_dir / "model"  # a full model, or a LoRA adapter with its base (models/lora.py)
    return (model / "config.json").is_file() or (model / "adapter_config.json").is_file()


def check_finished_stage(stage_dir: Path, stage: str, cfg) -> None:
    """Refuses (ValueError naming the fields) when ``cfg`` (a stage section) differs from the settings
    the run in ``stage_dir`` was made with, outside what a ``--resume`` may change: those of its
    newest checkpoint, else (a finished run without checkpoints) its ``config.yaml``. A directory
    with neither holds no run to compare with."""
    ckpt = latest_checkpoint(stage_dir)
    saved, where = None, None
    if ckpt is not None:
        saved, where = json.loads((ckpt / STATE_FILE).read_text()).get("config"), ckpt
    if saved is None and _done(stage_dir) and (stage_dir / "config.yaml").is_file():
        saved, where = config_mod.load_yaml(stage_dir / "config.yaml").get(stage), stage_dir / "config.yaml"
    if saved is not None:
        check_resume_config(saved, config_mod.to_dict(cfg), stage, where)


def _fill_paths(cfg: RunConfig, out: Path) -> None:
    """The stages' inputs that the pipeline wires up: RM from DIR/sft/model, PPO from DIR/sft/model
    and DIR/rm/model (unless the config names others)."""
    cfg.rm.sft_model = cfg.rm.sft_model or str(out / "sft" / "model")
    cfg.ppo.policy.path = cfg.ppo.policy.path or str(out / "sft" / "model")
    if cfg.ppo.reward.function is None and cfg.ppo.env is None:
        cfg.ppo.reward.model_path = cfg.ppo.reward.model_path or str(out / "rm" / "model")


def _start_error(cfg: RunConfig, out: Path, *, resume: bool, overwrite: bool) -> Optional[str]:
    """Why the pipeline must not start in ``out`` (None: it may); read-only."""
    if resume and overwrite:
        return f"--resume and --overwrite exclude each other: --resume continues the pipeline in {out}, --overwrite " \
               "deletes its stages' runs and starts again"
    if resume:
        for stage in STAGES:
            try:
                check_finished_stage(out / stage, stage, getattr(cfg, stage))
            except ValueError as e:
                return f"pipeline --resume: the {stage} stage in {out / stage} ran with other settings: {e}"
        return None
    found = [f"{stage}: {', '.join(f)}" for stage in STAGES if (f := previous_run(out / stage))]
    if (out / "summary.json").is_file():
        found.append("summary.json")
    if found and not overwrite:
        return (f"{out} holds a previous pipeline run ({'; '.join(found)}): pass --resume to continue it, --overwrite "
                "to delete it and start over, or choose another --output-dir")
    return None


def run_pipeline(cfg: RunConfig, output_dir, *, resume: bool = False, overwrite: bool = False, echo=print) -> dict:
    """SFT -> reward model -> PPO on ``cfg`` (a ``RunConfig``, e.g. ``load_config(presets=["ci"])``)
    into ``output_dir``/sft, /rm, /ppo; the RM starts from the SFT model and PPO from the SFT policy
    with that RM unless ``cfg.rm.sft_model`` / ``cfg.ppo.policy.path`` / ``cfg.ppo.reward`` say
    otherwise. ``resume`` / ``overwrite``: what to do with a previous run in ``output_dir``
    (``rlhf_fast.trainers.run.guard``). ``echo`` prints the progress lines and the summary table.
    Returns summary.json's dict."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    dist = dss.init_distributed(cfg.sft.deepspeed.backend, cfg.sft.deepspeed.timeout_s)
    _fill_paths(cfg, out)
    lock = OutputDirLock(out) if dist.is_main else None
    start_together(lambda: _start_error(cfg, out, resume=resume, overwrite=overwrite), dist=dist, lock=lock,
                   what=f"the pipeline in {out}")
    try:
        if overwrite and dist.is_main:
            (out / "summary.json").unlink(missing_ok=True)
        return _run_stages(cfg, out, dist, resume=resume, overwrite=overwrite, echo=echo)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(cfg: RunConfig, out: Path, dist, *, resume: bool, overwrite: bool, echo) -> dict:
    from rlhf_fast.trainers.ppo import PPOTrainer
    from rlhf_fast.trainers.rm import RMTrainer
    from rlhf_fast.trainers.sft import SFTTrainer

    t0 = time.perf_counter()
    seconds = {}
    sft_dir, rm_dir, ppo_dir = out / "sft", out / "rm", out / "ppo"
    # --overwrite: a stage deletes its earlier run only when it has one (a fresh stage directory is fine)
    again = dict(resume=resume, dist_info=dist)

    t = time.perf_counter()
    if not (resume and _done(sft_dir)):
        echo(f"[pipeline] 1/3 SFT -> {sft_dir}")
        SFTTrainer(cfg.sft, sft_dir, overwrite=overwrite, **again).fit()
    seconds["sft"] = time.perf_counter() - t

    t = time.perf_counter()
    if cfg.ppo.reward.function is not None or cfg.ppo.env is not None:  # checked / a function / an env: no RM
        echo(f"[pipeline] 2/3 no reward model: PPO is scored by {cfg.ppo.reward.function or 'the environment ' + cfg.ppo.env}")
    elif not (resume and _done(rm_dir)):
        echo(f"[pipeline] 2/3 reward model from {cfg.rm.sft_model} -> {rm_dir}")
        RMTrainer(cfg.rm, rm_dir, overwrite=overwrite, reference_data=cfg.sft.data,
                  policy_temperature=cfg.ppo.generation.temperature, **again).fit()
    seconds["rm"] = time.perf_counter() - t

    t = time.perf_counter()
    echo(f"[pipeline] 3/3 PPO from {cfg.ppo.policy.path} with "
         f"{cfg.ppo.reward.model_path or cfg.ppo.reward.function or 'the environment ' + str(cfg.ppo.env)}"
         f" -> {ppo_dir}")
    PPOTrainer(cfg.ppo, ppo_dir, overwrite=overwrite, **again).fit()
    seconds["ppo"] = time.perf_counter() - t

    summary = summarize(out, seconds=time.perf_counter() - t0, stage_seconds=seconds,
                        planned_iterations=cfg.ppo.iterations)
    summary["gold_metric"] = _gold_metric(cfg)
    summary["reward"] = cfg.ppo.reward.function or (cfg.ppo.env and f"env:{cfg.ppo.env}")  # None: the reward model
    if dist.is_main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
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
    last_train = train_rows[-1] if train_rows else {}
    return {
        "sft_gold_score": first.get("eval/gold_score"),
        "ppo_gold_score": last.get("eval/gold_score"),
        "sft_rm_score": first.get("eval/score"),
        "ppo_rm_score": last.get("eval/score"),
        "final_kl": last.get("eval/kl"),
        "final_train_kl": last_train.get("objective/kl"),
        # the missing-stop penalty moves the training score: a score of -1 can be 75 % of responses
        # cut without a stop token, not a bad reward (rlhf_fast/trainers/watch.py)
        "sft_missing_stop_frac": first.get("eval/missing_stop_frac"),
        "ppo_missing_stop_frac": last.get("eval/missing_stop_frac"),
        "final_train_score": last_train.get("objective/scores"),
        "final_train_raw_score": last_train.get("objective/raw_scores"),
        "final_train_missing_stop_frac": last_train.get("objective/missing_stop_frac"),
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

    def pct(v):
        return "-" if v is None else f"{v:.0%}"

    rows = [
        (f"{s.get('gold_metric', 'gold score')} (held-out prompts)", f(s["sft_gold_score"]), f(s["ppo_gold_score"])),
        (f"score ({s['reward']})" if s.get("reward") else "reward-model score",
         f(s["sft_rm_score"]), f(s["ppo_rm_score"])),
        ("responses without a stop token", pct(s.get("sft_missing_stop_frac")), pct(s.get("ppo_missing_stop_frac"))),
        ("KL to the SFT policy (nats/seq)", "0", f(s["final_kl"])),
    ]
    w = max(len(r[0]) for r in rows)
    lines = ["", f"{'':{w}}  {'SFT':>8}  {'PPO':>8}"]
    lines += [f"{a:{w}}  {b:>8}  {c:>8}" for a, b, c in rows]
    n, planned = s["ppo_iterations"], s.get("ppo_iterations_planned")
    if planned is not None and n < planned:  # a stop_after_iterations run: say so, and which eval the column is
        lines.append(f"STOPPED EARLY after {n} of {planned} PPO iterations: the PPO column is the evaluation "
                     f"at iteration {s.get('ppo_eval_iteration')}")
    if s.get("final_train_score") is not None:
        line = f"last PPO iteration: training score {f(s['final_train_score'])}"
        miss = s.get("final_train_missing_stop_frac")
        if miss:  # say what moved the score: the penalty on responses without a stop token
            line += (f" (reward alone {f(s.get('final_train_raw_score'))}; {pct(miss)} of the rollouts had no stop "
                     "token and got generation.missing_stop_penalty)")
        lines.append(line)
    lines.append(f"reward-model eval accuracy {f(s['rm_eval_accuracy'])}; {s['ppo_iterations']} PPO iterations; "
                 f"{s['seconds']:.0f} s (sft {s['stage_seconds'].get('sft', 0):.0f}, rm {s['stage_seconds'].get('rm', 0):.0f}, "
                 f"ppo {s['stage_seconds'].get('ppo', 0):.0f})")
    return "\n".join(lines)
