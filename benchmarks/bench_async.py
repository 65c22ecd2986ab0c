"""Asynchronous rollouts against the synchronous loop at the same total threads (issue 32).

    python benchmarks/bench_async.py                       # the full comparison; JSON record + plot
    python benchmarks/bench_async.py --iterations 6 --seeds 1   # a smoke run
    python benchmarks/bench_async.py --work DIR            # reuse DIR/sft/model and DIR/rm/model

What runs (each a ``rlhf-fast ppo`` process on the built-in task, ``--preset ci``, from one SFT policy
and one reward model that the first run trains with ``rlhf-fast pipeline --preset ci``):

  sync        the synchronous loop, OMP_NUM_THREADS = 2: the trainer generates, then trains
  sync-1t     the synchronous loop at OMP_NUM_THREADS = 1 (one core idle): with ``sync`` it gives each
              phase's cost at 1 and 2 threads, i.e. how well the small-batch phases use a second thread
  K=0,1,2     one rollout worker + the trainer, OMP_NUM_THREADS = 1 each (2 threads in all);
              K = 0 is the synchronous schedule run across two processes (no overlap: the worker waits
              for the current weights), K >= 1 overlaps generation of batch i with the update on i - 1

Throughput is iterations per second over iterations 2..N (the first holds the workers' fork and
warm-up; evaluations are outside ``perf/iteration_s``). The learning curve is the held-out gold score
at the evaluation steps; ``--seeds`` runs every setting with several seeds so the curves' spread
(the noise the K >= 1 curves are judged against) is measured, not guessed. Phase costs (generate +
score vs the trainer's log-probs + advantages + train, from the synchronous run) are recorded: the
setting is only meaningful where they are about equal, and they give the paper estimate for GPUs
(with rollout and training on separate devices the iteration time is max(gen, train) instead of the
sum, plus the weight sync).

Run it on a quiet machine: the timings of two single-thread processes are distorted by any other
load on the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, device_info, print_table, write_record  # noqa: E402

_DROP = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
         "LOCAL_WORLD_SIZE")
SETTINGS = {  # name -> (OMP threads per process, extra PPO arguments)
    "sync": (2, []),
    "sync-1t": (1, []),
    "K=0": (1, ["--ppo.rollout.workers", "1", "--ppo.rollout.max_staleness", "0"]),
    "K=1": (1, ["--ppo.rollout.workers", "1", "--ppo.rollout.max_staleness", "1"]),
    "K=2": (1, ["--ppo.rollout.workers", "1", "--ppo.rollout.max_staleness", "2"]),
    "K=1-tis": (1, ["--ppo.rollout.workers", "1", "--ppo.rollout.max_staleness", "1", "--ppo.rollout.correction",
                    "truncated_is"]),
    "K=2-tis": (1, ["--ppo.rollout.workers", "1", "--ppo.rollout.max_staleness", "2", "--ppo.rollout.correction",
                    "truncated_is"]),
}
SYNCHRONOUS = ("sync", "sync-1t")  # the synchronous loop, at 2 and at 1 OpenMP thread
DEFAULT_SETTINGS = ["sync", "sync-1t", "K=0", "K=1", "K=2"]


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    return {**env, "OMP_NUM_THREADS": str(threads), "RLHF_FAST_NO_TQDM": "1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_fast.cli", *args]


def prepare(work: Path) -> None:
    """DIR/sft/model and DIR/rm/model from ``--preset ci`` (skipped when they exist)."""
    if (work / "sft" / "model").is_dir() and (work / "rm" / "model").is_dir():
        return
    subprocess.run(_cli("pipeline", "--preset", "ci", "--output-dir", str(work), "--overwrite", "--ppo.iterations", "1"),
                   env=_env(2), check=True)


# ``--preset ci`` trains 2 epochs per batch: on 2 cores the trainer's phases then cost about twice the
# rollout's (generate + score); one epoch brings them near each other (measured phase costs are recorded)
BALANCE = ["--ppo.algo.num_epochs", "1"]


def run_ppo(work: Path, name: str, seed: int, iterations: int, eval_every: int, extra_args: list,
            reuse: bool = False) -> dict:
    """One ``rlhf-fast ppo`` run (or, with ``reuse``, the finished run of the same command in its directory:
    ``bench_async.json`` there records the command and its wall time) and its row."""
    threads, extra = SETTINGS[name]
    out = work / "runs" / f"{name.replace('=', '')}_seed{seed}"
    cmd = _cli("ppo", "--preset", "ci", "--output-dir", str(out), "--overwrite",
               "--ppo.policy.path", str(work / "sft" / "model"), "--ppo.reward.model_path", str(work / "rm" / "model"),
               "--ppo.iterations", str(iterations), "--ppo.logging.eval_every", str(eval_every), "--ppo.seed", str(seed),
               "--ppo.logging.tensorboard", "false", *extra_args, *extra)
    done = out / "bench_async.json"
    if reuse and done.is_file() and json.loads(done.read_text())["cmd"] == cmd[1:]:
        wall = json.loads(done.read_text())["wall_s"]
    else:
        t0 = time.perf_counter()
        subprocess.run(cmd, env=_env(threads), check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        done.write_text(json.dumps({"cmd": cmd[1:], "wall_s": wall}))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train = [r for r in rows if "objective/kl" in r]
    steady = [r["perf/iteration_s"] for r in train[1:]]
    phase = lambda *ks: statistics.mean(sum(r.get(f"time/{k}_s", 0.0) for k in ks) for r in train[1:])  # noqa: E731
    phases = {k: round(phase(k), 4) for k in ("generate", "score", "logprobs", "advantages", "train")}
    return {"impl": name, "seed": seed, "threads_per_process": threads, "iterations": len(train),
            "wall_s": round(wall, 2) if wall is not None else None,
            "iterations_per_s": round(len(steady) / sum(steady), 4),
            "gen_score_s": round(phase("generate", "score"), 4),
            "trainer_s": round(phase("logprobs", "advantages", "train"), 4), "phases_s": phases,
            "rollout_wait_s": round(statistics.mean(r.get("async/rollout_wait_s", 0.0) for r in train[1:]), 4),
            "weight_sync_s": round(statistics.mean(r.get("async/weight_sync_s", 0.0) for r in train[1:]), 5),
            "weight_sync_mb": train[-1].get("async/weight_sync_mb"),
            "staleness": [r.get("async/staleness", 0.0) for r in train],
            "gold": [(r["step"], r["eval/gold_score"]) for r in rows if "eval/gold_score" in r]}


def _mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _vs_sync(mine: list[dict], sync: list[dict]) -> dict:
    """The learning-curve statistics against the synchronous loop's runs ``sync``.

    Per evaluation step: the difference of the seed means and the sync seeds' standard deviation there
    (``within_sync_2std``: every step's mean lies within 2 sync standard deviations of the sync mean);
    at the final step: the difference of means over its standard error sqrt(s_a^2 / n_a + s_s^2 / n_s),
    a Welch t statistic (|t| < 2: not distinguishable from the sync seeds with these many seeds).
    """
    steps = [s for s, _ in sync[0]["gold"]][1:]  # step 0 is the shared SFT policy
    per_step = []
    for i, step in enumerate(steps, start=1):
        a, (ms, ss) = _mean_std([r["gold"][i][1] for r in mine]), _mean_std([r["gold"][i][1] for r in sync])
        per_step.append({"step": step, "diff": round(a[0] - ms, 4), "sync_std": round(ss, 4)})
    fa, fs = [r["gold"][-1][1] for r in mine], [r["gold"][-1][1] for r in sync]
    (ma, sa), (ms, ss) = _mean_std(fa), _mean_std(fs)
    se = (sa ** 2 / len(fa) + ss ** 2 / len(fs)) ** 0.5
    return {"per_step": per_step, "within_sync_2std": all(abs(p["diff"]) <= 2 * p["sync_std"] for p in per_step),
            "final_diff": round(ma - ms, 4), "final_diff_se": round(se, 4),
            "final_t": round((ma - ms) / se, 2) if se > 0 else None}


def summarize(results: list[dict], names: list[str]) -> dict:
    """Per setting: throughput (mean, std, ratio to each synchronous baseline), phase costs, the gold curve's
    mean and std per evaluation step over seeds, and (with a ``sync`` setting) the curve against sync's."""
    out = {}
    by = {n: [r for r in results if r["impl"] == n] for n in names}
    for n, mine in by.items():
        ips = _mean_std([r["iterations_per_s"] for r in mine])
        steps = [s for s, _ in mine[0]["gold"]]
        out[n] = {"iterations_per_s_mean": round(ips[0], 4), "iterations_per_s_std": round(ips[1], 4),
                  "gen_score_s_mean": round(statistics.mean(r["gen_score_s"] for r in mine), 4),
                  "trainer_s_mean": round(statistics.mean(r["trainer_s"] for r in mine), 4),
                  "gold_mean_std": [(s, *(round(v, 4) for v in _mean_std([r["gold"][i][1] for r in mine])))
                                    for i, s in enumerate(steps)],
                  "final_gold": [r["gold"][-1][1] for r in mine]}
    for base in ("sync", "sync-1t"):
        if base in by:
            for n in out:
                out[n][f"speedup_vs_{base}"] = round(out[n]["iterations_per_s_mean"] / out[base]["iterations_per_s_mean"], 3)
    # the noise the curves are judged against: every synchronous run (both thread counts: their curves
    # differ by the seed and by the floating-point summation order of 1 vs 2 OpenMP threads)
    reference = [r for n in SYNCHRONOUS if n in by for r in by[n]]
    if reference:
        for n in out:
            out[n]["gold_vs_synchronous"] = {"reference": [n for n in SYNCHRONOUS if n in by],
                                             **_vs_sync(by[n], reference)}
    return out


def plot(results: list[dict], path: Path, note: str = "") -> None:
    """Left: iterations / s per setting (bar: mean, dots: seeds). Right: the gold curve's mean over seeds
    per setting with a +-1 std band (thin lines: each seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(dict.fromkeys(r["impl"] for r in results))
    for i, n in enumerate(names):
        mine = [r for r in results if r["impl"] == n]
        a.bar(i, statistics.mean(r["iterations_per_s"] for r in mine), color=f"C{i}")
        a.scatter([i] * len(mine), [r["iterations_per_s"] for r in mine], color="k", s=8, zorder=3)
        steps = [s for s, _ in mine[0]["gold"]]
        ms = [_mean_std([r["gold"][k][1] for r in mine]) for k in range(len(steps))]
        b.plot(steps, [m for m, _ in ms], color=f"C{i}", marker="o", ms=3, label=f"{n} ({len(mine)} seeds)")
        b.fill_between(steps, [m - s for m, s in ms], [m + s for m, s in ms], color=f"C{i}", alpha=0.12)
        for r in mine:
            b.plot(steps, [g for _, g in r["gold"]], color=f"C{i}", lw=0.5, alpha=0.35)
    a.set_xticks(range(len(names)), names)
    a.set_ylabel("PPO iterations / s (2 threads in all)")
    a.set_title("throughput" + (f" ({note[:60]})" if note else ""), fontsize=9)
    b.set_xlabel("iteration")
    b.set_ylabel("held-out gold score")
    b.set_title("learning curve: mean +- std over seeds")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def resummarize(path: Path) -> None:
    """A record written by an earlier version of this script, summarised and plotted by this one."""
    rec = json.loads(path.read_text())
    names = list(dict.fromkeys(r["impl"] for r in rec["results"]))
    rec["config"]["summary"] = summarize(rec["results"], names)
    path.write_text(json.dumps(rec, indent=1))
    plot(rec["results"], path.with_suffix(".png"), rec["config"].get("note", ""))
    print(json.dumps(rec["config"]["summary"], indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/rlhf_fast_bench_async"))
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=list(SETTINGS))
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--ppo-args", default=" ".join(BALANCE),
                    help=f"more PPO arguments for every run, one string: --ppo-args='--ppo.optim.lr 2e-4 ...' "
                         f"(default {' '.join(BALANCE)!r})")
    ap.add_argument("--reuse", action="store_true",
                    help="read a run already finished by this script with the same command instead of rerunning it "
                         "(the learning curve is a function of the seed; its throughput is that run's)")
    ap.add_argument("--note", default="", help="recorded with the results (e.g. 'machine shared with other jobs')")
    ap.add_argument("--resummarize", type=Path, metavar="RECORD",
                    help="no runs: recompute RECORD's summary with this script's statistics, rewrite it, redraw its plot")
    args = ap.parse_args(argv)
    if args.resummarize:
        return resummarize(args.resummarize)
    args.ppo_args = shlex.split(args.ppo_args)
    prepare(args.work)
    results = [run_ppo(args.work, name, seed, args.iterations, args.eval_every, args.ppo_args, args.reuse)
               for seed in range(args.first_seed, args.first_seed + args.seeds) for name in args.settings]
    print_table(results, ["impl", "seed", "iterations_per_s", "gen_score_s", "trainer_s", "rollout_wait_s",
                          "weight_sync_s", "gold"])
    summary = summarize(results, args.settings)
    print(json.dumps(summary, indent=1))
    with torch.no_grad():
        path = write_record("async", torch.device("cpu"), {"preset": "ci", "iterations": args.iterations,
                                                            "eval_every": args.eval_every, "seeds": args.seeds,
                                                            "ppo_args": args.ppo_args,
                                                            "settings": {k: SETTINGS[k] for k in args.settings},
                                                            "note": args.note, "summary": summary}, results)
    plot(results, path.with_suffix(".png"), args.note)
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
