"""glibc's defaults vs rlhf_fast's malloc policy (rlhf_fast/_malloc.py), in processes that did other work.

    python benchmarks/bench_malloc.py            # [512, 1024] after other work, 3 processes per policy; record
    python benchmarks/bench_malloc.py --quick    # 1 process per policy, fewer repetitions
    pytest benchmarks/bench_malloc.py            # CI: both children run at a small shape and report

Each policy runs in fresh child processes with no ``MALLOC_*`` variable set, as a user's would be:
``rlhf_fast`` (nothing set: what ``import rlhf_fast`` applies) and ``glibc`` (``RLHF_FAST_MALLOC_POLICY=off``).
A child first does other work, as a PPO process has before its advantage step: the RL-math ops at a
smaller shape ([64, 1024]: 256 KB outputs, the size of a held-out op check) and a log-prob call.
This leaves glibc's dynamic mmap threshold just above those blocks; the [512, 1024] outputs (2 MB
each) then come from the heap top and are trimmed back to the OS after every call (issue 35:
~1,000 minor page faults per ``gae`` call). It then times ``shape_rewards``, ``gae``,
``masked_whiten`` and the three in a row at [B, T] (``bench_rlmath.py``'s inputs and bytes per
token), reporting GB/s, percent of one core's copy bandwidth (``_common.measured_cpu_bandwidth_gbps``,
measured in the same child) and minor page faults per call.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common  # noqa: E402
import bench_rlmath  # noqa: E402

import rlhf_fast  # noqa: E402  (as a user's process does: applies the policy, or not)
import rlhf_fast.ops as ops  # noqa: E402

POLICIES = {"glibc": {"RLHF_FAST_MALLOC_POLICY": "off"}, "rlhf_fast": {}}


def _rlmath_small(stages=("shaping", "gae", "whiten", "pipeline")) -> None:
    calls = bench_rlmath._calls(bench_rlmath.STAGES["rlhf_fast"], bench_rlmath.make_inputs(64, 1024, "cpu"))
    for stage in stages:
        calls[stage]()


def _logprobs() -> None:
    g = torch.Generator().manual_seed(1)
    ops.gather_logprobs(torch.randn(64, 32000, generator=g), torch.randint(0, 32000, (64,), generator=g))


OTHER_WORK = {
    "none": lambda: None,  # a fresh process: what a benchmark used to measure
    "gae_small": lambda: _rlmath_small(("gae",)),  # the same op at a smaller shape first (an op check)
    "rlmath_small": _rlmath_small,  # every RL-math stage at [64, 1024] first
    "logprobs_then_rlmath": lambda: (_logprobs(), _rlmath_small()),  # an 8 MB logits block freed first
}
"""What the process did before the timed calls. Which of these leaves glibc's dynamic thresholds
where [512, 1024]'s 2 MB outputs are trimmed after every call depends on the sizes freed so far:
the record shows each."""


def child(B: int, T: int, reps: int, work: str) -> dict:
    """Runs in the child process: other work, then each stage timed with the faults it takes."""
    torch.set_num_threads(1)
    x = bench_rlmath.make_inputs(B, T, "cpu")  # the rollout a PPO process holds, made before the other work
    OTHER_WORK[work]()
    bw = _common.measured_cpu_bandwidth_gbps()
    rows = {}
    for stage, fn in bench_rlmath._calls(bench_rlmath.STAGES["rlhf_fast"], x).items():
        with torch.no_grad():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = _common.time_fn(fn, torch.device("cpu"), reps=reps, warmup=3)
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / (reps + 3)
        gbps = bench_rlmath.BYTES_PER_TOKEN[stage] * B * T / (t["p50_ms"] / 1e3) / 1e9
        rows[stage] = {**t, "gbps": gbps, "pct_copy_bw": 100 * gbps / bw, "minor_faults_per_call": faults}
    return {"policy": rlhf_fast._malloc.MALLOC_POLICY, "copy_bw_gbps": bw, "stages": rows}


def run_policy(name: str, B: int, T: int, reps: int, work: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "RLHF_FAST_MALLOC_POLICY"}
    env.update(POLICIES[name], OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", f"{B},{T},{reps},{work}"], env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"bench_malloc child ({name}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(B: int, T: int, reps: int, processes: int, works=tuple(OTHER_WORK)) -> list[dict]:
    """One row per (other work, policy, stage): p50 over the processes' p50s, each process's kept.
    Policies alternate process by process, so a change in machine load hits both alike."""
    runs = {(work, name): [] for work in works for name in POLICIES}
    for _ in range(processes):
        for work, name in runs:
            runs[work, name].append(run_policy(name, B, T, reps, work))
    dev = _common.device_info(torch.device("cpu"))
    rows = []
    for (work, name), rs in runs.items():
        for stage in rs[0]["stages"]:
            per = [r["stages"][stage] for r in rs]
            timing = {k: sorted(p[k] for p in per)[len(per) // 2] for k in ("p20_ms", "p50_ms", "p80_ms")}
            rows.append(_common.result_row(
                name, {"B": B, "T": T, "other_work": work}, stage, timing, dev,
                bytes_moved=bench_rlmath.BYTES_PER_TOKEN[stage] * B * T,
                pct_copy_bw_same_process=round(sorted(p["pct_copy_bw"] for p in per)[len(per) // 2], 1),
                minor_faults_per_call=round(sorted(p["minor_faults_per_call"] for p in per)[len(per) // 2], 1),
                per_process_p50_ms=[round(p["p50_ms"], 4) for p in per], policy=rs[0]["policy"]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="512,1024", help="B,T of the timed ops (default 512,1024)")
    p.add_argument("--other-work", default=",".join(OTHER_WORK), help=f"comma-separated, of {list(OTHER_WORK)}")
    p.add_argument("--processes", type=int, default=3, help="child processes per policy, alternated")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="1 process per policy, 20 repetitions")
    p.add_argument("--under-load", action="store_true", help="mark the record as taken on a shared, loaded machine")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        B, T, reps, work = args.child.split(",")
        print(json.dumps(child(int(B), int(T), int(reps), work)))
        return
    B, T = map(int, args.shape.split(","))
    processes, reps = (1, 20) if args.quick else (args.processes, args.reps)
    load_before = os.getloadavg()
    works = args.other_work.split(",")
    if unknown := set(works) - set(OTHER_WORK):
        p.error(f"--other-work: unknown {sorted(unknown)}; choose from {list(OTHER_WORK)}")
    rows = measure(B, T, reps, processes, works)
    flat = [{**r, **r["case"]} for r in rows]
    _common.print_table(flat, ["other_work", "impl", "B", "T", "pass", "p50_ms", "gbps", "pct_peak_bandwidth", "pct_copy_bw_same_process",
                               "minor_faults_per_call"])
    if not args.no_save:
        config = {"shape": [B, T], "processes_per_policy": processes, "reps": reps, "torch_threads": 1,
                  "other_work": works,
                  "policies": {k: v or "nothing set (import rlhf_fast applies its policy)" for k, v in POLICIES.items()},
                  "load_before": load_before, "load_after": os.getloadavg(), "under_load": args.under_load}
        print("record:", _common.write_record("malloc", torch.device("cpu"), config, rows))


def test_bench_malloc_children_report():
    rows = measure(64, 512, reps=2, processes=1, works=("gae_small",))
    by = {(r["impl"], r["pass"]): r for r in rows}
    assert set(by) == {(p, s) for p in POLICIES for s in ("shaping", "gae", "whiten", "pipeline")}
    assert by[("rlhf_fast", "gae")]["policy"].startswith("glibc mallopt")
    assert by[("glibc", "gae")]["policy"] == "glibc defaults (RLHF_FAST_MALLOC_POLICY=off)"
    assert all(r["p50_ms"] > 0 and r["minor_faults_per_call"] >= 0 for r in rows)


if __name__ == "__main__":
    main()
