"""The real TRL PPOTrainer (trl 0.25.1) against rlhf_fast's PPOTrainer over a grid, not at one point
(issue 35, part 6): precision x response lengths x model depth / width x vocabulary.

    python benchmarks/peer_trl_grid.py                  # the whole grid: 2 x 2 x 2 x 3 = 24 points
    python benchmarks/peer_trl_grid.py --shapes 6x256 --vocabs 1024 --pairs 3      # a slice
    python benchmarks/peer_trl_grid.py --note "machine shared with other jobs"

Every point is ``benchmarks/peer_trl_ppo.py``'s comparison (same runners, settings, deviations and
thread / allocator handling; its docstring and ``benchmarks/PEERS.md``) on other inputs:

  precision  fp32 on both sides, or bf16 on both: TRL's own default (accelerate's autocast over fp32
             weights, its update only) against rlhf_fast's ``ppo.deepspeed.dtype bf16``
  lengths    "fixed": a policy that never draws EOS (every response runs to R); "eos": one whose
             responses stop at EOS after ~R/5 tokens on average (about geometric; the task's SFT policy
             in peer_trl_ppo.py answers in ~10 of 48). Both trainers keep EOS stopping on; the model
             decides (``benchmarks/peers/grid_inputs.py``: how the EOS logit is set without training)
  shape      Llama depth x width: 6x256 (the held-out harness's: 6 layers, hidden 256, 4 heads, MLP 768)
             and 12x512 (8 heads, MLP 1536)
  vocab      1,024 (the held-out harness's), 32,000 (Llama 2) and 151,936 (Qwen2 / Qwen3); the task's
             tokenizer has 631 tokens, the rest is unused vocabulary (as Qwen2's padded tail)

Models are built from configs with random weights (nothing downloaded or trained): the policy (and
the reference, a second copy of it) and a reward model that is also both sides' critic init. Each
point runs ``--pairs`` pairs of one TRL and one rlhf_fast process, alternated with the order flipped
every pair (TRL, ours, ours, TRL, ...: a linear drift of the machine's speed cancels over two pairs),
``--iters`` PPO iterations each, the first excluded (warm-up). A pair's ratio is TRL's median
seconds per kept iteration over rlhf_fast's in that pair; a point's ratio is the median of its pairs'
ratios (p20 / p80 beside it). The JSON record ``results/peer_trl_grid_cpu_<CPU>_<date>.json`` holds
every point (both sides' phases, response lengths, peak RSS, per-pair ratios, ``uptime`` before and
after), the range over the grid and the median ratio along each axis; a plot goes beside it.

Sizes (B = 8, R = 16, 2 minibatches, 2 epochs, 3 iterations of which 2 are kept, 2 pairs by
default): at B = 16, R = 32 one pair of the 12x512, V = 151,936 point alone took 7 minutes here, under load (0.2 B-
parameter policy, 0.3 B trained with the critic; ~65-85 s per iteration), so the whole grid would
have taken hours. Small B and R weigh per-token and per-iteration overheads (HF generate's Python
loop, TRL's gc.collect) more than B = 64, R = 48 does: the ratios here are not the ratios at the
held-out harness's size. That size at its own point: ``--batch 64 --resp-len 48 --epochs 4 --shapes
6x256 --vocabs 1024``. Never run in CI (a ``peer_*`` name: pytest does not collect it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))  # this checkout's rlhf_fast, not another one the venv may have installed
import _common  # noqa: E402
import peer_trl_ppo as peer  # noqa: E402
from peers import grid_inputs  # noqa: E402

SHAPES = {"6x256": dict(layers=6, hidden=256, heads=4, mlp=768), "12x512": dict(layers=12, hidden=512, heads=8, mlp=1536)}
VOCABS = (1024, 32000, 151936)
PRECISIONS = ("fp32", "bf16")
LENGTHS = ("fixed", "eos")
GRID_SETTINGS = {  # where the grid's inputs differ from peer_trl_ppo.py's SETTINGS
    "model": "Llama from a config, random weights (benchmarks/peers/grid_inputs.py), float32 on disk; the point's "
             "shape and vocabulary; the task's 631-token tokenizer",
    "policy": "AutoModelForCausalLM from the point's policy directory ('fixed': EOS never drawn; 'eos': EOS logit set "
              "for a mean response length of --eos-mean); reference = a second copy of it",
    "reward_model": "AutoModelForSequenceClassification (num_labels 1) with random weights and score layer",
    "final_save": "rlhf_fast's checkpoint / final model / plots after the last iteration skipped (outside the timed "
                  "iterations; TRL's runner saves nothing)",
}
TEMPERATURE = 0.7  # both sides' sampling and log-prob temperature (peer_trl_ppo.py)


def _points(args) -> list[dict]:
    return [{"shape": s, "vocab": v, "lengths": ln, "precision": pr}
            for s in args.shapes for v in args.vocabs for ln in args.lengths for pr in args.precisions]


def _load() -> float:
    return os.getloadavg()[0]


def run_point(args, point: dict, inputs: dict, env: dict, work: Path) -> dict:
    """``args.pairs`` alternated pairs of runs at one grid point; the point's summary."""
    ns = Namespace(batch=args.batch, resp_len=args.resp_len, minibatches=args.minibatches, epochs=args.epochs,
                   iters=args.iters, lr=args.lr, precision=point["precision"], ours_old_logprobs="recompute",
                   ours_fused_adamw=args.ours_fused_adamw)
    side_inputs = {"policy_dir": inputs["policy_dirs"][point["lengths"]], "reward_dir": inputs["reward_dir"],
                   "prompts": inputs["prompts"]}
    spec = {**side_inputs, "batch": args.batch, "resp_len": args.resp_len, "minibatches": args.minibatches,
            "epochs": args.epochs, "iters": args.iters, "threads": args.threads, "temperature": TEMPERATURE,
            "kl_coef": 0.05, "lr": args.lr, "adam_eps": 1e-5, "seed": 1, "missing_eos_penalty": 1.0,
            "precision": point["precision"], "skip_final_save": True, "trl_optim": args.trl_optim,
            "overrides": peer.rlhf_fast_overrides(ns, side_inputs)}
    sides = {"trl": (args.trl_python, HERE / "peers" / "trl_ppo_runner.py", env),
             "rlhf_fast": (sys.executable, HERE / "peers" / "rlhf_fast_ppo_runner.py", peer.checkout_env(env))}
    runs: dict[str, list] = {"trl": [], "rlhf_fast": []}
    load_before, uptime_before, t0 = _load(), peer.uptime(), time.perf_counter()
    for pair in range(args.pairs):
        order = ("trl", "rlhf_fast") if pair % 2 == 0 else ("rlhf_fast", "trl")
        for impl in order:
            python, runner, side_env = sides[impl]
            res = peer.run_child(python, runner, spec, work / f"{impl}_{pair}", side_env, impl)
            runs[impl].append(res)
            print(f"  pair {pair} {impl:9s} s/iteration {[round(it['iteration_s'], 2) for it in res['iterations']]} "
                  f"process {res['process_wall_s']:.0f} s", flush=True)
            shutil.rmtree(work / f"{impl}_{pair}", ignore_errors=True)  # rlhf_fast's output dir, TRL's out
    summary = {impl: peer.summarise(rs, warmup=1) for impl, rs in runs.items()}
    t, f = summary["trl"], summary["rlhf_fast"]
    pair_ratios = [a / b for a, b in zip(t["per_run_median_iteration_s"], f["per_run_median_iteration_s"])]
    phases = ("iteration_s", "rollout_s", "generate_s", "update_s")
    out = {**point, **SHAPES[point["shape"]], "params": inputs["params"],
           "pair_ratios": [round(r, 4) for r in pair_ratios],
           "ratio": {k: round(v, 4) for k, v in peer._q(pair_ratios).items()},
           "phase_ratios_of_medians": {ph[:-2]: round(t[ph]["p50"] / f[ph]["p50"], 4) for ph in phases},
           "seconds": {impl: {ph[:-2]: {k: round(v, 4) for k, v in summary[impl][ph].items()} for ph in phases}
                       for impl in runs},
           "peak_rss_mb": {impl: round(summary[impl]["peak_rss_mb"], 1) for impl in runs},
           "load_s": {impl: round(summary[impl]["load_s"], 2) for impl in runs},
           "trl_optimizer": runs["trl"][0].get("optimizer"),  # fused AdamW unless --trl-optim says otherwise
           "trl_resp_len_max": [it.get("resp_len_max") for r in runs["trl"] for it in r["iterations"][1:]],
           "rlhf_fast_resp_len_mean": [it.get("resp_len_mean") for r in runs["rlhf_fast"]
                                       for it in r["iterations"][1:]],
           "trl_phases_p50_s": {k: round(v["p50"], 4) for k, v in t.items() if k.startswith("phase_")},
           "rlhf_fast_phases_p50_s": {k: round(v["p50"], 4) for k, v in f.items() if k.startswith("phase_")},
           "load1_before": load_before, "load1_after": _load(), "uptime_before": uptime_before,
           "wall_s": round(time.perf_counter() - t0, 1)}
    return out


def axis_medians(points: list[dict]) -> dict:
    """Median point ratio along each axis value: which settings move the ratio."""
    out = {}
    for axis in ("precision", "lengths", "shape", "vocab"):
        vals = list(dict.fromkeys(p[axis] for p in points))
        out[axis] = {str(v): round(statistics.median(p["ratio"]["p50"] for p in points if p[axis] == v), 3)
                     for v in vals}
    return out


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(p["shape"] for p in points))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4), sharey=True, squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for i, (pr, ln) in enumerate([(pr, ln) for pr in PRECISIONS for ln in LENGTHS]):
            mine = sorted((p for p in points if (p["shape"], p["precision"], p["lengths"]) == (shape, pr, ln)),
                          key=lambda p: p["vocab"])
            if not mine:
                continue
            x = [p["vocab"] * (1 + 0.04 * (i - 1.5)) for p in mine]  # side by side at each vocabulary
            y = [p["ratio"]["p50"] for p in mine]
            err = [[p["ratio"]["p50"] - p["ratio"]["p20"] for p in mine], [p["ratio"]["p80"] - p["ratio"]["p50"] for p in mine]]
            ax.errorbar(x, y, yerr=err, marker="o" if pr == "fp32" else "s", ls="-" if ln == "eos" else "--",
                        color=f"C{i}", capsize=3, label=f"{pr}, {ln}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("vocabulary")
        ax.set_title(f"Llama {shape} (layers x hidden)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TRL s/iteration / rlhf_fast s/iteration")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(points: list[dict]) -> str:
    """One row per point: both sides' s/iteration (p50), the ratio (median of pair ratios, p20-p80), the
    rollout and update ratios, the response lengths each side saw."""
    out = ["| shape | V | lengths | precision | TRL s/it | rlhf_fast s/it | TRL / rlhf_fast (p20-p80) | rollout | update "
           "| TRL longest / ours mean response |", "|" + "---|" * 10]
    for p in points:
        s, r, ph = p["seconds"], p["ratio"], p["phase_ratios_of_medians"]
        lens = [x for x in p["trl_resp_len_max"] if x is not None]
        ours = [x for x in p["rlhf_fast_resp_len_mean"] if x is not None]
        out.append(f"| {p['shape']} | {p['vocab']:,} | {p['lengths']} | {p['precision']} | "
                   f"{s['trl']['iteration']['p50']:.2f} | {s['rlhf_fast']['iteration']['p50']:.2f} | "
                   f"**{r['p50']:.2f}x** ({r['p20']:.2f}-{r['p80']:.2f}) | {ph['rollout']:.2f}x | {ph['update']:.2f}x | "
                   f"{max(lens) if lens else '-'} / {statistics.mean(ours) if ours else 0:.1f} |")
    return "\n".join(out)


def result_rows(points: list[dict], args, dev: dict) -> list[dict]:
    rows = []
    for p in points:
        case = {"precision": p["precision"], "lengths": p["lengths"], "shape": p["shape"], "V": p["vocab"],
                "B": args.batch, "R": args.resp_len}
        for impl in ("trl", "rlhf_fast"):
            s = p["seconds"][impl]["iteration"]
            timing = {"p20_ms": s["p20"] * 1e3, "p50_ms": s["p50"] * 1e3, "p80_ms": s["p80"] * 1e3}
            extra = {"trl_over_rlhf_fast": p["ratio"]["p50"]} if impl == "trl" else {}
            rows.append(_common.result_row(impl, case, "iteration", timing, dev, peak_rss_mb=p["peak_rss_mb"][impl],
                                           **extra))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--vocabs", nargs="+", type=int, default=list(VOCABS))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    p.add_argument("--lengths", nargs="+", default=list(LENGTHS), choices=LENGTHS)
    p.add_argument("--batch", type=int, default=8, help="rollout batch B (default 8)")
    p.add_argument("--resp-len", type=int, default=16, help="maximum response length R (default 16)")
    p.add_argument("--minibatches", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--iters", type=int, default=3, help="PPO iterations per run, the first a warm-up (default 3)")
    p.add_argument("--pairs", type=int, default=2, help="alternated pairs per point (default 2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--eos-mean", type=float, default=None,
                   help="mean response length of the 'eos' policy before the cut at R (default R / 5)")
    p.add_argument("--inputs-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "rlhf_fast",
                                                         "peer_trl_grid_inputs"))
    p.add_argument("--trl-python", default=os.environ.get("TRL_PYTHON", peer.DEFAULT_TRL_PYTHON))
    p.add_argument("--ours-fused-adamw", action="store_true",
                   help="rlhf_fast's side with ppo.optim.fused true (torch's fused AdamW on a CPU, as TRL's default)")
    p.add_argument("--trl-optim", default=None,
                   help="TRL's PPOConfig.optim (default: transformers' own, adamw_torch_fused with torch >= 2.8; "
                        "adamw_torch steps with the per-tensor AdamW loop that rlhf_fast uses on a CPU)")
    p.add_argument("--note", default="", help="recorded with the results (e.g. 'under load: shared machine')")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--table", metavar="RECORD", help="print RECORD's points as a markdown table and exit")
    args = p.parse_args(argv)
    if args.table:
        points = json.loads(Path(args.table).read_text())["config"]["points"]
        print(markdown_table(points))
        print(json.dumps(summarise_grid(points), indent=1))
        sys.exit(0)
    if args.batch % args.minibatches:
        p.error("--batch must be a multiple of --minibatches")
    if args.iters < 2:
        p.error("--iters must be at least 2 (the first is a warm-up)")
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    if args.eos_mean is None:
        args.eos_mean = args.resp_len / 5
    if args.eos_mean <= 1:
        p.error("--eos-mean must be above 1 token")
    if not (os.path.isfile(args.trl_python) and os.access(args.trl_python, os.X_OK)):
        sys.exit(f"peer_trl_grid: no TRL venv at {args.trl_python} (benchmarks/PEERS.md says how to make one)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    tv = peer.trl_versions(args.trl_python)
    torch.set_num_threads(args.threads)
    dev_info = _common.device_info(torch.device("cpu"))  # also builds / loads the C++ kernels before any run
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false", "RLHF_FAST_NO_TQDM": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}  # each side's users' allocator
    uptime_before, t_all = peer.uptime(), time.perf_counter()
    print("load before:", uptime_before, flush=True)
    work = Path(tempfile.mkdtemp(prefix="peer_trl_grid_"))
    inputs, points = {}, []
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    tag = "-".join(p for p in "".join(c if c.isalnum() else "-" for c in dev_info["name"].split("(")[0]).split("-") if p)
    path = _common.RESULTS_DIR / f"peer_trl_grid_cpu_{tag[:48]}_{stamp}.json"
    for point in _points(args):
        key = (point["shape"], point["vocab"])
        if key not in inputs:
            d = Path(args.inputs_dir).expanduser() / f"{point['shape']}_V{point['vocab']}"
            inputs[key] = grid_inputs.build(d, **SHAPES[point["shape"]], vocab=point["vocab"], resp_len=args.resp_len,
                                            eos_mean=args.eos_mean, temperature=TEMPERATURE)
        res = run_point(args, point, inputs[key], env, work)
        points.append(res)
        s = res["seconds"]
        print(f"{point['shape']:7s} V={point['vocab']:<6d} {point['lengths']:5s} {point['precision']}: TRL "
              f"{s['trl']['iteration']['p50']:.2f} s, rlhf_fast {s['rlhf_fast']['iteration']['p50']:.2f} s, "
              f"ratio {res['ratio']['p50']:.2f} (pairs {res['pair_ratios']}), TRL longest response "
              f"{res['trl_resp_len_max']}, load {res['load1_before']:.1f}->{res['load1_after']:.1f}, "
              f"{res['wall_s']:.0f} s", flush=True)
        if not args.no_save:  # the record so far after every point: a stopped grid keeps its finished points
            save(path, args, points, inputs, tv, dev_info, uptime_before, t_all, complete=False)
    summary = summarise_grid(points)
    print(json.dumps(summary, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    if not args.no_save:
        save(path, args, points, inputs, tv, dev_info, uptime_before, t_all, complete=True)
        plot(points, path.with_suffix(".png"))
        print(f"record: {path} and {path.with_suffix('.png')}")
    return summary


def summarise_grid(points: list[dict]) -> dict:
    ratios = [p["ratio"]["p50"] for p in points]
    pick = ("shape", "vocab", "lengths", "precision")
    return {"ratio_min": min(ratios), "ratio_median": round(statistics.median(ratios), 4), "ratio_max": max(ratios),
            "min_point": {k: points[ratios.index(min(ratios))][k] for k in pick},
            "max_point": {k: points[ratios.index(max(ratios))][k] for k in pick},
            "points_below_1": sum(r < 1 for r in ratios), "points": len(ratios), "axis_medians": axis_medians(points)}


def save(path: Path, args, points: list[dict], inputs: dict, tv: dict, dev_info: dict, uptime_before: str,
         t_all: float, *, complete: bool) -> None:
    loads = [x for p in points for x in (p["load1_before"], p["load1_after"])]
    config = {"what": "real TRL PPOTrainer vs rlhf_fast PPOTrainer over a grid (benchmarks/peer_trl_grid.py)",
              "complete": complete, "args": vars(args), "settings": {**peer.SETTINGS, **GRID_SETTINGS},
              "deviations": peer.DEVIATIONS, "inputs": {f"{k[0]}_V{k[1]}": v for k, v in inputs.items()},
              "summary": summarise_grid(points), "points": points,
              "under_load": max(loads) > args.threads + 0.5,  # the runs alone keep `threads` cores busy
              "load1_max": max(loads), "note": args.note, "uptime_before": uptime_before, "uptime_now": peer.uptime(),
              "cpu": peer.cpu_facts(), "versions_trl_venv": tv, "wall_s": round(time.perf_counter() - t_all, 1)}
    record = _common.make_record("peer_trl_grid", torch.device("cpu"), config, result_rows(points, args, dev_info))
    record["device"] = dev_info  # measured once, at the start
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
