"""A training stage alone, then next to a competing copy of itself: the slowdown vs the fair share.

    python benchmarks/bench_contention.py            # SFT stage of --preset ci, 40 steps; JSON record
    python benchmarks/bench_contention.py --quick    # 3 steps, a smoke run
    pytest benchmarks/bench_contention.py --benchmark-disable   # CI: the quick run, checked

Issue 23 (thread hygiene): with 3-4 processes on a 2-core machine one SFT stage took 28 min instead
of 75 s (~22x where the fair share is ~3x). Each OpenMP worker of torch's pool spins after every
parallel region before it sleeps (libgomp's default: 300000 spins, about 3 ms), and a training step
runs thousands of small regions, so a process's idle threads keep its cores busy and take the time
slices the other process's working threads need. rlhf_fast sets OMP_WAIT_POLICY=PASSIVE when it is
imported before torch (rlhf_fast/_threads.py); its C++ ops use torch's pool (at::parallel_for).

Policies measured, each alone and with one competitor (both processes run the same stage with the
same thread count, by default one thread per core, i.e. the machine oversubscribed 2x):
  spin     libgomp's default when nothing is set (GOMP_SPINCOUNT=300000 reproduces it)
  passive  OMP_WAIT_POLICY=PASSIVE (rlhf_fast's default)
The slowdown is the contended wall time of the measured process over its time alone; the fair
share is the number of processes sharing the cores (2). Wall time covers the whole command
(start-up and model save included, about the same alone and contended).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_info, print_table, write_record  # noqa: E402

POLICIES = {"spin": {"GOMP_SPINCOUNT": "300000"}, "short": {"GOMP_SPINCOUNT": "10000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


# Inherited from a parent that joined a process group (e.g. pytest after a distributed test): the two
# stages must each pick their own free port and be rank 0 of their own 1-rank group.
_DROP = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
         "LOCAL_WORLD_SIZE")


def _env(policy: str, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DROP}
    return {**env, **POLICIES[policy], "OMP_NUM_THREADS": str(threads)}


def _cmd(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "rlhf_fast.cli", "sft", "--preset", "ci", "--output-dir", str(out),
            "--sft.max_steps", str(steps), "--overwrite"]


def run_stage(policy: str, threads: int, steps: int, competitors: int, workdir: Path) -> float:
    """Wall seconds of one stage run while `competitors` copies of it run alongside."""
    procs = []
    for i in range(competitors):  # started first, so the measured run is contended from its start
        procs.append(subprocess.Popen(_cmd(workdir / f"competitor{i}", steps * 3), env=_env(policy, threads),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(0.5 if competitors else 0.0)
    t0 = time.perf_counter()
    res = subprocess.run(_cmd(workdir / "measured", steps), env=_env(policy, threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    for p in procs:
        p.kill()
        p.wait()
    if res.returncode != 0:
        raise RuntimeError(f"the stage failed ({policy}):\n{res.stderr[-2000:]}")
    return wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 steps, one repetition")
    p.add_argument("--steps", type=int, default=40, help="SFT steps of the measured run")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each process")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--policies", default="spin,passive")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    steps, reps = (3, 1) if args.quick else (args.steps, args.reps)
    dev = device_info(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for policy in args.policies.split(","):
            alone, shared = [], []
            for _ in range(reps):  # alternate alone / contended so drifting load hits both
                alone.append(run_stage(policy, args.threads, steps, 0, Path(tmp)))
                shared.append(run_stage(policy, args.threads, steps, 1, Path(tmp)))
            a, s = statistics.median(alone), statistics.median(shared)
            rows.append({"impl": policy, "case": {"stage": "sft --preset ci", "steps": steps, "threads": args.threads},
                         "pass": "stage", "alone_s": round(a, 2), "contended_s": round(s, 2),
                         "slowdown": round(s / a, 2), "fair_share": 2.0, "over_fair_share": round(s / a / 2.0, 2),
                         "p50_ms": round(s * 1e3, 1)})
            print(f"{policy:8s} alone {a:7.2f} s   with a competitor {s:7.2f} s   slowdown {s / a:5.2f}x "
                  f"(fair share 2x)", flush=True)
    print_table(rows, ["impl", "alone_s", "contended_s", "slowdown", "over_fair_share"])
    if not args.no_save:
        path = write_record("contention", torch.device("cpu"), {"steps": steps, "threads": args.threads, "reps": reps,
                                                                "policies": POLICIES}, rows)
        print(f"wrote {path}")
    return 0


def test_bench_contention_quick(tmp_path, monkeypatch):
    """Both policies run the stage alone and contended, and the record says by how much."""
    monkeypatch.setattr(sys.modules[__name__], "write_record", lambda *a, **k: tmp_path / "x.json")
    assert main(["--quick", "--threads", "1", "--policies", "passive", "--reps", "1"]) == 0


if __name__ == "__main__":
    raise SystemExit(main())
