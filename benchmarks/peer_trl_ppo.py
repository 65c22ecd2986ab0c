"""rlhf_fast's PPO against the REAL TRL PPOTrainer (trl 0.25.1, ``trl.PPOTrainer``, the last release
that has it), not a replica: the same models, prompts and settings, run side by side on this machine.

    python benchmarks/peer_trl_ppo.py                          # B=64, R=48, 2 minibatches, 4 epochs, 1 thread
    python benchmarks/peer_trl_ppo.py --batch 32 --resp-len 24 --minibatches 1
    TRL_PYTHON=/path/to/venv/bin/python python benchmarks/peer_trl_ppo.py --pairs 5 --iters 8

Not a ``bench_*.py`` file on purpose: pytest collects those in CI, and this needs a second virtual
environment with TRL (``benchmarks/README.md``, "The real TRL PPOTrainer": how to make it). Never
run in CI.

What it does, in one run:
  (a) inputs, built once with rlhf_fast in this venv and cached (``--inputs-dir``): the built-in
      task's SFT policy (``rlhf-fast sft``, the task's default model size ``size=task``, ``--arch``,
      ``--sft-steps`` steps) and reward model (``rlhf-fast rm`` from it, ``--rm-steps`` steps,
      normalisation off), the RM exported as a Hugging Face ``AutoModelForSequenceClassification``
      directory with num_labels 1 (``export_reward_model``; transformers' own load of it is checked
      to score as rlhf_fast's RM), the tokenizer (saved with the policy) and the task's training
      prompts as JSONL. Only speed is measured, so short training is enough.
  (b) TRL's PPOTrainer (``benchmarks/peers/trl_ppo_runner.py``, run by ``--trl-python``) and
      rlhf_fast's PPOTrainer (``benchmarks/peers/rlhf_fast_ppo_runner.py``, this venv's python),
      each in its own process, on those inputs: the policy from the SFT directory, the reward model
      AND the critic / value model from the exported RM directory (critic initialised from the RM),
      the same prompts, batch, response length, minibatches, epochs, temperature, KL coefficient,
      learning rate, EOS stopping (``SETTINGS`` and ``DEVIATIONS`` go into the record).
  (c) ``--pairs`` A/B pairs, alternating (TRL, rlhf_fast, TRL, rlhf_fast, ...), ``--iters`` PPO
      iterations per run, the first of each run excluded (warm-up); seconds per iteration (median,
      p20, p80 over all kept iterations) and per phase (rollout / update, and generation), each
      child's peak RSS (``os.wait4``'s rusage of that child), the ratio TRL / rlhf_fast of the medians
      and the median of the per-pair ratios.
  (d) the replica baseline ``benchmarks/bench_ppo.py`` at the same B, R and minibatches (random
      weights, fixed-length responses, no EOS stopping: its docstring), so the record shows replica
      vs real (``--replica-reps 0`` skips it).
  (e) a JSON record ``benchmarks/results/peer_trl_ppo_cpu_<CPU>_<date>.json`` (``_common``'s format,
      plus CPU flags, torch's CPU capability, thread count, both venvs' versions, ``uptime`` before
      and after).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # this checkout's rlhf_fast, not another one the venv may have installed
import _common  # noqa: E402

DEFAULT_TRL_PYTHON = "/work/trlvenv/bin/python"
TRL_VERSION = "0.25.1"

# Every setting both sides get (the record holds them with the values of this run).
SETTINGS = {
    "model": "the built-in task's (tiny_sentiment) model at size 'task' (hidden 256, 4 layers, 4 heads, MLP 768, "
             "631-token vocabulary), float32, trained briefly by rlhf-fast sft / rm; --arch llama (default) or gpt2",
    "policy": "AutoModelForCausalLM from the SFT directory (both sides); reference = a second copy of it",
    "reward_model": "AutoModelForSequenceClassification (num_labels 1) exported from rlhf-fast rm's model",
    "critic": "a second copy of the reward model: TRL value_model = the RM directory; rlhf_fast ppo.critic "
              "'separate' (initialised from the RM's raw head, critic_with_rm_normalization false)",
    "prompts": "the task's 4000 training prompts (JSONL, 'prompt' field), tokenized with add_special_tokens (this "
               "tokenizer adds no BOS) by both (rlhf_fast/data/datasets.py PromptDataset; TRL: tok(prompt))",
    "sampling": "temperature 0.7 (TRL: 0.7 + 1e-7), top_k 0, top_p 1, stop at EOS during generation",
    "kl": "k1 estimator in the reward, fixed coefficient 0.05",
    "ppo": "gamma 1, lam 0.95, clip 0.2, value clip 0.2, vf_coef 0.1, advantages whitened, rewards not whitened, "
           "no gradient clipping, epochs x minibatches optimizer steps, micro-batch = minibatch",
    "optimizer": "AdamW, same lr for policy and critic, eps 1e-5, linear decay",
    "threads": "torch.set_num_threads(--threads) and OMP_NUM_THREADS in both children",
    "logging": "TRL: report_to none, logging_steps 1, no tqdm, num_sample_generations 0, no saving; rlhf_fast: "
               "metrics.jsonl + samples.jsonl every iteration (its defaults), no TensorBoard, no progress bar, "
               "eval only before the first / after the last iteration (outside the timed iterations), one "
               "checkpoint at the end (outside them)",
}
DEVIATIONS = [
    "Old log-probs: TRL takes them from the generation logits (output_scores); rlhf_fast recomputes them with a "
    "policy forward (its default ppo.old_logprobs: recompute; --ours-old-logprobs rollout takes the engine's, as TRL).",
    "Response tensors: TRL trims to the longest response in the batch (HF generate stops when all rows hit EOS) and "
    "scores / trains on (B, P + longest); rlhf_fast's engine also stops at the longest (finished rows leave the "
    "batch), but PPOTrainer pads the rollout back to max_new_tokens (rlhf_fast/trainers/rollout.py, "
    "RolloutStage.respond: the same R on every rank), so its score, log-prob and update forwards run on (B, P + R). "
    "With responses much shorter than R this is most of the difference (the record has TRL's longest response per "
    "iteration and rlhf_fast's mean response length).",
    "Score position: TRL adds the score one token after the EOS (sequence_lengths_p1) and trains values there; "
    "rlhf_fast on the EOS (README, tldr preset). Missing EOS: TRL subtracts missing_eos_penalty (set to 1.0 here); "
    "rlhf_fast replaces the score with -1 (its default missing_stop_penalty 'replace').",
    "One optimizer over policy + value model in TRL (PolicyAndValueWrapper, one forward of each per micro-batch); "
    "two in rlhf_fast (policy engine, critic engine; DeepSpeed ZeRO-0 engines on one process).",
    "TRL's OnPolicyConfig defaults to bf16 mixed precision (bf16 = not fp16); set to fp32 here as rlhf_fast.",
    "Reward model bias: LlamaForSequenceClassification / GPT2ForSequenceClassification have no score bias, so the "
    "export drops rlhf_fast's head bias (a constant shift of every score; both sides read the same exported model).",
    "Prompt order: each trainer shuffles the prompts with its own RNG (same prompt set, other batches).",
    "TRL's loop runs gc.collect() twice per iteration and empty_cache(); rlhf_fast writes metrics.jsonl and "
    "samples.jsonl each iteration: both are part of each side's per-iteration time.",
    "--precision bf16: TRL's bf16 (its default) is accelerate's autocast around the prepared PolicyAndValueWrapper, "
    "i.e. the update's forwards; its rollout (generation, reference, value and reward forwards on the unwrapped "
    "float32 models) stays float32. rlhf_fast's ppo.deepspeed.dtype bf16 holds the trained models in bf16 (float32 "
    "master weights in DeepSpeed's optimizer) and the frozen ones in bf16, so its rollout runs in bf16 too.",
]


# ---- device facts ------------------------------------------------------------------------------------------------


def cpu_facts() -> dict:
    flags, model = set(), None
    try:
        for ln in open("/proc/cpuinfo"):
            if ln.startswith("model name") and model is None:
                model = ln.split(":", 1)[1].strip()
            if ln.startswith("flags") and not flags:
                flags = set(ln.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")
    return {"model_name": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in wanted},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return open("/proc/loadavg").read().strip()


# ---- (a) shared inputs -------------------------------------------------------------------------------------------


def _cli(args: list[str], log: Path, env: dict) -> None:
    cmd = [sys.executable, "-m", "rlhf_fast.cli", *args]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        sys.exit(f"peer_trl_ppo: {' '.join(cmd)} failed (exit {proc.returncode}); see {log}")


def export_reward_model(rm_dir: Path, out: Path) -> dict:
    """rlhf_fast's reward model (``RewardModel.save_pretrained``: backbone + ``rlhf_fast_heads.safetensors``,
    ``rlhf_fast/models/reward.py``) as an ``AutoModelForSequenceClassification`` directory with num_labels 1,
    the format TRL loads for reward and value models: ``score.weight`` = gain * head weight. The head bias and
    the normalisation bias are dropped (the HF decoder classifiers' score layer has no bias): every score moves by
    one constant. Checks that transformers' own load scores as rlhf_fast's RM (minus that constant) and that
    rlhf_fast loads the export back (``rlhf_fast/models/hf_classifier.py``)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_fast.models import RewardModel

    rm = RewardModel.from_pretrained(str(rm_dir)).eval()
    cfg = rm.backbone.config.__class__.from_dict(rm.backbone.config.to_dict())
    cfg.num_labels = 1
    cfg.architectures = None
    cls_model = AutoModelForSequenceClassification.from_config(cfg).eval()
    base = getattr(cls_model, cls_model.base_model_prefix)
    missing, unexpected = base.load_state_dict(rm.backbone.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"backbone weights do not map onto {type(cls_model).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    with torch.no_grad():
        cls_model.score.weight.copy_(rm.head.linear.weight * rm.gain)
    cls_model.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(str(rm_dir))
    tok.save_pretrained(out)
    # check: transformers' load == rlhf_fast's RM minus the dropped constant; rlhf_fast loads it back
    hf = AutoModelForSequenceClassification.from_pretrained(out, num_labels=1).eval()
    ids = torch.tensor([tok("the gentle horse passed the river")["input_ids"] + [tok.eos_token_id]])
    with torch.no_grad():
        ours = float(rm(ids, torch.ones_like(ids)).scores[0])
        const = float(rm.head.linear.bias[0] * rm.gain + rm.bias) if rm.head.linear.bias is not None else float(rm.bias)
        theirs = float(hf(input_ids=ids).logits[0, 0])
        back = float(RewardModel.from_pretrained(str(out)).eval()(ids, torch.ones_like(ids)).scores[0])
    if abs(ours - const - theirs) > 1e-4 or abs(back - theirs) > 1e-4:
        raise RuntimeError(f"exported reward model scores {theirs:.6f} (rlhf_fast reload {back:.6f}); "
                           f"rlhf_fast's RM {ours:.6f} minus its bias {const:.6f}")
    return {"hf_class": type(cls_model).__name__, "dropped_bias": const, "check_score_hf": theirs,
            "check_score_rlhf_fast": ours}


def build_inputs(args, env: dict) -> dict:
    d = Path(args.inputs_dir).expanduser() / f"{args.arch}-sft{args.sft_steps}-rm{args.rm_steps}"
    done = d / "inputs.json"
    if done.exists() and not args.rebuild_inputs:
        print(f"inputs: cached in {d}")
        return json.loads(done.read_text())
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    common = ["--overwrite"]
    print(f"inputs: SFT ({args.sft_steps} steps) -> {d}/sft", flush=True)
    _cli(["sft", "--output-dir", str(d / "sft"), "--sft.model.arch", args.arch, "--sft.model.size", "task",
          "--sft.max_steps", str(args.sft_steps), "--sft.logging.save_every", "0", "--sft.logging.tensorboard", "false",
          "--sft.logging.progress_bar", "false", *common], d / "sft.log", env)
    print(f"inputs: RM ({args.rm_steps} steps) -> {d}/rm", flush=True)
    _cli(["rm", "--output-dir", str(d / "rm"), "--rm.sft_model", str(d / "sft" / "model"),
          "--rm.max_steps", str(args.rm_steps), "--rm.normalization", "none", "--rm.logging.save_every", "0",
          "--rm.logging.tensorboard", "false", "--rm.logging.progress_bar", "false", *common], d / "rm.log", env)
    export = export_reward_model(d / "rm" / "model", d / "reward_hf")
    from rlhf_fast.tasks import get_task

    with open(d / "prompts.jsonl", "w") as f:
        for r in get_task("tiny_sentiment").prompt_records("train"):
            f.write(json.dumps({"prompt": r["prompt"]}) + "\n")
    info = {"dir": str(d), "policy_dir": str(d / "sft" / "model"), "reward_dir": str(d / "reward_hf"),
            "rlhf_fast_rm_dir": str(d / "rm" / "model"), "prompts": str(d / "prompts.jsonl"),
            "sft_steps": args.sft_steps, "rm_steps": args.rm_steps, "arch": args.arch, "export": export,
            "build_s": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(info, indent=1))
    return info


# ---- (b, c) the runs ---------------------------------------------------------------------------------------------


def rlhf_fast_overrides(args, inputs: dict) -> list[str]:
    """The ``--ppo.*`` overrides of rlhf_fast's side (``rlhf-fast ppo`` takes the same)."""
    o = {
        "ppo.policy.path": inputs["policy_dir"],
        "ppo.reward.model_path": inputs["reward_dir"],
        "ppo.data.train_file": inputs["prompts"],
        "ppo.rollout_batch_size": args.batch,
        "ppo.reward.batch_size": max(64, args.batch),
        "ppo.generation.max_new_tokens": args.resp_len,
        "ppo.generation.temperature": 0.7,
        "ppo.generation.stop_at_eos": "true",
        "ppo.algo.temperature": 0.7,
        "ppo.algo.num_minibatches": args.minibatches,
        "ppo.algo.num_epochs": args.epochs,
        "ppo.algo.kl_init": 0.05,
        "ppo.algo.kl_controller": "fixed",
        "ppo.critic": "separate",
        "ppo.old_logprobs": args.ours_old_logprobs,
        "ppo.optim.lr": args.lr,
        "ppo.critic_optim.lr": args.lr,
        "ppo.iterations": args.iters,
        "ppo.eval_prompts": 8,
        "ppo.logging.eval_every": 0,
        "ppo.logging.save_every": 0,
        "ppo.logging.tensorboard": "false",
        "ppo.logging.progress_bar": "false",
        "ppo.seed": 1,
    }
    if args.precision == "bf16":
        o["ppo.deepspeed.dtype"] = "bf16"
    if getattr(args, "ours_fused_adamw", False):  # torch's fused AdamW on the CPU too (optim.fused)
        o["ppo.optim.fused"] = o["ppo.critic_optim.fused"] = "true"
    out = []
    for k, v in o.items():
        out += [f"--{k}", str(v)]
    return out


def checkout_env(env: dict) -> dict:
    """``env`` with this checkout first on PYTHONPATH: the rlhf_fast child runs this repository's code even
    when the venv has another checkout installed (a git worktree beside the main one)."""
    repo = str(HERE.parent)
    return {**env, "PYTHONPATH": os.pathsep.join([repo, *filter(None, [env.get("PYTHONPATH")])])}


def run_child(python: str, runner: Path, spec: dict, work: Path, env: dict, tag: str) -> dict:
    """One runner process; its own JSON plus the peak RSS of that child from ``os.wait4``."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "work_dir": str(work)}
    spec_path, out_path, log = work / "spec.json", work / "out.json", work / "log.txt"
    spec_path.write_text(json.dumps(spec, indent=1))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([python, str(runner), str(spec_path), str(out_path)], stdout=f,
                                stderr=subprocess.STDOUT, env=env, cwd=str(work))
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode or not out_path.exists():
        tail = "".join(open(log).readlines()[-30:])
        sys.exit(f"peer_trl_ppo: the {tag} run failed (exit {proc.returncode}); log {log}:\n{tail}")
    res = json.loads(out_path.read_text())
    res["peak_rss_mb"] = rusage.ru_maxrss / 1024  # KiB on Linux
    res["process_wall_s"] = wall
    res["user_s"], res["sys_s"] = rusage.ru_utime, rusage.ru_stime
    return res


def _q(xs: list[float]) -> dict:
    xs = sorted(xs)
    if len(xs) == 1:
        return {"p20": xs[0], "p50": xs[0], "p80": xs[0]}
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"p20": q[1], "p50": statistics.median(xs), "p80": q[7]}


def summarise(runs: list[dict], warmup: int) -> dict:
    """Per phase: quantiles over the kept iterations of all runs; per run: its median iteration."""
    kept = [it for r in runs for it in r["iterations"][warmup:]]
    phases = ["iteration_s", "rollout_s", "generate_s", "update_s"]
    out = {ph: _q([it[ph] for it in kept]) for ph in phases}
    out["rollout_other_s"] = _q([it["rollout_s"] - it["generate_s"] for it in kept])
    extra = sorted({k for it in kept for k in it.get("phases", {})})
    for k in extra:
        out[f"phase_{k}_s"] = _q([it["phases"][k] for it in kept])
    out["per_run_median_iteration_s"] = [statistics.median(it["iteration_s"] for it in r["iterations"][warmup:])
                                         for r in runs]
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["kept_iterations"] = len(kept)
    out["load_s"] = statistics.median(r["load_s"] for r in runs)
    return out


# ---- (d) the replica ---------------------------------------------------------------------------------------------


def run_replica(args, env: dict, work: Path) -> dict | None:
    if args.replica_reps <= 0:
        return None
    out = work / "replica.json"
    cmd = [sys.executable, str(HERE / "bench_ppo.py"), "--threads", str(args.threads), "--batch", str(args.batch),
           "--resp-len", str(args.resp_len), "--minibatches", str(args.minibatches), "--reps", str(args.replica_reps),
           "--no-save", "--json-out", str(out)]
    print("replica:", " ".join(cmd[1:]), flush=True)
    with open(work / "replica.log", "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, rusage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) or not out.exists():
        print(f"replica run failed; see {work / 'replica.log'}")
        return None
    rec = json.loads(out.read_text())
    rec["peak_rss_mb_process"] = rusage.ru_maxrss / 1024  # all three replica impls live in that one process
    return rec


# ---- (e) the record ----------------------------------------------------------------------------------------------


def trl_versions(python: str) -> dict:
    code = ("import json,sys,torch,transformers,trl,accelerate,datasets;print(json.dumps({'python':sys.version.split()[0],"
            "'torch':torch.__version__,'trl':trl.__version__,'transformers':transformers.__version__,"
            "'accelerate':accelerate.__version__,'datasets':datasets.__version__,"
            "'cpu_capability':torch.backends.cpu.get_cpu_capability()}))")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
    if proc.returncode:
        sys.exit(f"peer_trl_ppo: {python} cannot import TRL:\n{proc.stderr[-2000:]}\n"
                 "Make the TRL venv as benchmarks/README.md says (\"The real TRL PPOTrainer\").")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads in every child (default 1)")
    p.add_argument("--batch", type=int, default=64, help="rollout batch B (prompts per iteration)")
    p.add_argument("--resp-len", type=int, default=48, help="maximum response length R (EOS stops earlier)")
    p.add_argument("--minibatches", type=int, default=2, help="minibatches per epoch")
    p.add_argument("--epochs", type=int, default=4, help="PPO epochs per iteration")
    p.add_argument("--iters", type=int, default=5, help="PPO iterations per run (the first is a warm-up)")
    p.add_argument("--pairs", type=int, default=3, help="A/B pairs (TRL run, rlhf_fast run), alternating")
    p.add_argument("--lr", type=float, default=1e-5, help="learning rate of policy and critic (both sides)")
    p.add_argument("--arch", default="llama", choices=("llama", "gpt2"),
                   help="model family of the task-size model (the default pipeline's is gpt2)")
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--rm-steps", type=int, default=30)
    p.add_argument("--ours-fused-adamw", action="store_true",
                   help="rlhf_fast's side with ppo.optim.fused / critic_optim.fused true (torch's fused AdamW on a CPU)")
    p.add_argument("--ours-old-logprobs", default="recompute", choices=("recompute", "rollout"),
                   help="rlhf_fast's ppo.old_logprobs (rollout: from the engine, as TRL)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="fp32 on both sides (default), or bf16 on both: TRL's own default (OnPolicyConfig bf16, "
                        "accelerate's autocast over fp32 weights) against rlhf_fast's ppo.deepspeed.dtype bf16 (bf16 "
                        "weights, fp32 master copy in the optimizer)")
    p.add_argument("--allocator", default="users", choices=("users", "same"),
                   help="users (default): each side with the malloc its users get (rlhf_fast sets its policy on "
                        "import, rlhf_fast/_malloc.py; TRL runs on glibc's defaults); same: both with rlhf_fast's "
                        "policy through MALLOC_* variables (the setting of the records before issue 35)")
    p.add_argument("--trl-optim", default=None,
                   help="TRL's PPOConfig.optim (default: transformers' own, adamw_torch_fused with torch >= 2.8; "
                        "adamw_torch steps with the per-tensor AdamW loop that rlhf_fast uses on a CPU)")
    p.add_argument("--replica-reps", type=int, default=3, help="bench_ppo.py repetitions (0: skip the replica)")
    p.add_argument("--inputs-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"),
                                                         "rlhf_fast", "peer_trl_inputs"))
    p.add_argument("--rebuild-inputs", action="store_true")
    p.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", DEFAULT_TRL_PYTHON),
                   help=f"python of the TRL venv (default $TRL_PYTHON or {DEFAULT_TRL_PYTHON})")
    p.add_argument("--keep-work", action="store_true", help="keep the runs' directories (logs, metrics)")
    p.add_argument("--no-save", action="store_true", help="do not write a JSON record")
    args = p.parse_args(argv)
    if args.batch % args.minibatches:
        p.error("--batch must be a multiple of --minibatches")
    if args.iters < 2:
        p.error("--iters must be at least 2 (the first is a warm-up)")
    if not (os.path.isfile(args.trl_python) and os.access(args.trl_python, os.X_OK)):
        sys.exit(f"peer_trl_ppo: no TRL venv at {args.trl_python}. Make one (benchmarks/README.md, \"The real TRL "
                 "PPOTrainer\"): python3 -m venv /work/trlvenv; /work/trlvenv/bin/pip install torch==2.13.0; "
                 "/work/trlvenv/bin/pip install -c CONSTRAINTS trl==0.25.1 (CONSTRAINTS: a file with torch==2.13.0); "
                 "or pass --trl-python / set TRL_PYTHON.")
    tv = trl_versions(args.trl_python)
    if tv["trl"] != TRL_VERSION:
        print(f"warning: the TRL venv has trl {tv['trl']}, not {TRL_VERSION} (the last release with PPOTrainer)")
    torch.set_num_threads(args.threads)
    load_before = uptime()
    print("load before:", load_before, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false", "RLHF_FAST_NO_TQDM": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}  # what each side's users get, unless --allocator same
    if args.allocator == "same":  # rlhf_fast/_malloc.py's policy, given to both sides
        env.update(MALLOC_MMAP_THRESHOLD_="33554432", MALLOC_TRIM_THRESHOLD_="1073741824")
    t_all = time.perf_counter()
    inputs = build_inputs(args, checkout_env(env))
    spec = {"policy_dir": inputs["policy_dir"], "reward_dir": inputs["reward_dir"], "prompts": inputs["prompts"],
            "batch": args.batch, "resp_len": args.resp_len, "minibatches": args.minibatches, "epochs": args.epochs,
            "iters": args.iters, "threads": args.threads, "temperature": 0.7, "kl_coef": 0.05, "lr": args.lr,
            "adam_eps": 1e-5, "seed": 1, "missing_eos_penalty": 1.0, "precision": args.precision,
            "trl_optim": args.trl_optim,
            "overrides": rlhf_fast_overrides(args, inputs)}
    work = Path(tempfile.mkdtemp(prefix="peer_trl_ppo_"))
    runs = {"trl": [], "rlhf_fast": []}
    sides = {"trl": (args.trl_python, HERE / "peers" / "trl_ppo_runner.py"),
             "rlhf_fast": (sys.executable, HERE / "peers" / "rlhf_fast_ppo_runner.py")}
    envs = {"trl": env, "rlhf_fast": checkout_env(env)}
    for pair in range(args.pairs):
        for impl in ("trl", "rlhf_fast"):
            python, runner = sides[impl]
            res = run_child(python, runner, spec, work / f"{impl}_{pair}", envs[impl], impl)
            runs[impl].append(res)
            its = [round(it["iteration_s"], 2) for it in res["iterations"]]
            print(f"pair {pair} {impl:9s} s/iteration {its}  peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    replica = run_replica(args, env, work)
    load_after = uptime()
    print("load after:", load_after)
    summary = {impl: summarise(rs, warmup=1) for impl, rs in runs.items()}
    t, f = summary["trl"], summary["rlhf_fast"]
    ratios = {ph: round(t[ph]["p50"] / f[ph]["p50"], 3) for ph in ("iteration_s", "rollout_s", "generate_s",
                                                                      "rollout_other_s", "update_s")}
    paired = [a / b for a, b in zip(t["per_run_median_iteration_s"], f["per_run_median_iteration_s"])]
    ratios["iteration_s_paired_median"] = round(statistics.median(paired), 3)
    ratios["peak_rss"] = round(t["peak_rss_mb"] / f["peak_rss_mb"], 3)
    resp_lens = [it.get("resp_len_max") for r in runs["trl"] for it in r["iterations"][1:]]

    # the table
    rows = []
    for impl in ("trl", "rlhf_fast"):
        s = summary[impl]
        rows.append({"impl": impl, "iteration": f"{s['iteration_s']['p50']:.3f}",
                     "p20-p80": f"{s['iteration_s']['p20']:.3f}-{s['iteration_s']['p80']:.3f}",
                     "rollout": f"{s['rollout_s']['p50']:.3f}", "generate": f"{s['generate_s']['p50']:.3f}",
                     "update": f"{s['update_s']['p50']:.3f}", "peak_MB": f"{s['peak_rss_mb']:.0f}"})
    rep_rows = []
    if replica:
        for impl in ("trl_style", "rlhf_fast", "rlhf_fast_rollout_lp"):
            ph = {r["pass"]: r["seconds_p50"] for r in replica["results"] if r["impl"] == impl}
            rollout = sum(ph.get(k, 0.0) for k in ("generate", "score", "logprobs", "advantages"))
            rep_rows.append({"impl": f"replica:{impl}", "iteration": f"{ph.get('total', 0):.3f}", "p20-p80": "",
                             "rollout": f"{rollout:.3f}", "generate": f"{ph.get('generate', 0):.3f}",
                             "update": f"{ph.get('train', 0):.3f}", "peak_MB": ""})
    print(f"\nB={args.batch} R={args.resp_len} minibatches={args.minibatches} epochs={args.epochs} "
          f"threads={args.threads}; {args.pairs} pairs x {args.iters - 1} kept iterations; seconds per iteration (p50)")
    _common.print_table(rows + rep_rows, ["impl", "iteration", "p20-p80", "rollout", "generate", "update", "peak_MB"])
    print("TRL / rlhf_fast:", ratios)
    if args.no_save:
        return summary
    dev = torch.device("cpu")
    results = []
    for impl in ("trl", "rlhf_fast"):
        s = summary[impl]
        case = {"B": args.batch, "R": args.resp_len, "minibatches": args.minibatches, "epochs": args.epochs,
                "arch": args.arch, "threads": args.threads, "precision": args.precision,
                "allocator": args.allocator}
        for ph in ("iteration_s", "rollout_s", "generate_s", "rollout_other_s", "update_s",
                   *[k for k in s if k.startswith("phase_")]):
            timing = {"p20_ms": s[ph]["p20"] * 1e3, "p50_ms": s[ph]["p50"] * 1e3, "p80_ms": s[ph]["p80"] * 1e3}
            extra = {"seconds_p50": round(s[ph]["p50"], 4)}
            if impl == "trl" and ph in ratios:
                extra["trl_over_rlhf_fast"] = ratios[ph]
            if ph == "iteration_s":
                extra["peak_rss_mb"] = round(s["peak_rss_mb"], 1)
            results.append(_common.result_row(impl, case, ph[:-2], timing, _common.device_info(dev), **extra))
    config = {
        "what": "real TRL PPOTrainer vs rlhf_fast PPOTrainer, same inputs (benchmarks/peer_trl_ppo.py)",
        "args": vars(args), "settings": SETTINGS, "deviations": DEVIATIONS, "inputs": inputs,
        "rlhf_fast_overrides": spec["overrides"], "trl_spec": {k: v for k, v in spec.items() if k != "overrides"},
        "cpu": cpu_facts(), "torch_threads": args.threads, "load_before": load_before, "load_after": load_after,
        "versions_trl_venv": tv, "versions_rlhf_fast_venv": runs["rlhf_fast"][0]["versions"],
        "params": runs["trl"][0].get("params"), "trl_resp_len_max_per_iteration": resp_lens,
        "ratios_trl_over_rlhf_fast": ratios, "summary": summary,
        "runs": {impl: [{k: v for k, v in r.items() if k not in ("log_history", "last_metrics")} for r in rs]
                 for impl, rs in runs.items()},
        "rlhf_fast_last_metrics": runs["rlhf_fast"][-1].get("last_metrics"),
        "rlhf_fast_mean_response_length_last_iteration": [r.get("last_metrics", {}).get("objective/response_length")
                                                          for r in runs["rlhf_fast"]],
        "trl_last_log": (runs["trl"][-1].get("log_history") or [None])[-1],
        "replica": ({"config": replica["config"], "results": replica["results"],
                     "peak_rss_mb_process": replica["peak_rss_mb_process"]} if replica else None),
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    path = _common.write_record("peer_trl_ppo", dev, config, results)
    print("record:", path)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print("work:", work)
    return summary


if __name__ == "__main__":
    main()
