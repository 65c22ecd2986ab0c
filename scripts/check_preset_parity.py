#!/usr/bin/env python
"""Held-out check: PPO updates under the paper presets against the float64 re-derivations of their
sources' updates, on cases the test suite does not run: several seeds, bigger batches, more
minibatches and epochs, micro-batching on and off, more updates of a longer run.

- ``lm_human_preferences`` vs openai/lm-human-preferences
  (``rlhf_fast.trainers.parity.preset_vs_upstream``);
- ``tldr`` vs summarize_from_feedback_details ``ppo.py`` and ``ppo_max`` vs MOSS-RLHF
  (``rlhf_fast.trainers.parity.preset_sources``; group sizes, micro-batches that straddle the
  groups, a gradient clip that acts or not).

    python scripts/check_preset_parity.py                    # every preset, all cases, JSON on stdout
    python scripts/check_preset_parity.py --quick            # the first two cases of each
    python scripts/check_preset_parity.py --preset ppo_max   # one preset

Exit status 1 when a case's parameter difference exceeds ``--bound`` (default 1e-3, the issue's
bound) times its largest parameter update, when the scores or (lm_human_preferences) the lr of any
optimizer step differ, or when the KL coefficients drift apart.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

CASES = [
    dict(seed=11, B=8, R=8, nminibatches=2, noptepochs=4, micro_batch_size=None, updates=2, n_updates=4),
    dict(seed=12, B=12, R=10, nminibatches=3, noptepochs=2, micro_batch_size=2, updates=3, n_updates=5),
    dict(seed=13, B=16, R=6, nminibatches=1, noptepochs=4, micro_batch_size=5, updates=2, n_updates=2),
    dict(seed=14, B=8, R=12, nminibatches=4, noptepochs=1, micro_batch_size=1, updates=3, n_updates=10, lr=3e-3),
    dict(seed=15, B=10, R=9, nminibatches=2, noptepochs=3, micro_batch_size=None, updates=2, n_updates=3,
         min_length=4),
]


SOURCE_CASES = {
    "tldr": [
        dict(seed=21, B=8, R=8, group_rows=4, epochs=2, micro_batch_size=3, updates=2, n_updates=3),
        dict(seed=22, B=12, R=10, group_rows=3, epochs=2, nminibatches=2, micro_batch_size=2, updates=2, n_updates=4),
        dict(seed=23, B=16, R=6, group_rows=16, epochs=4, micro_batch_size=5, updates=2, n_updates=2),
        dict(seed=24, B=8, R=12, group_rows=1, epochs=1, nminibatches=4, micro_batch_size=1, updates=3, n_updates=10,
             lr=3e-3),
    ],
    "ppo_max": [
        dict(seed=31, B=8, R=8, micro_batch_size=3, updates=2, n_updates=20),
        dict(seed=32, B=14, R=10, micro_batch_size=4, updates=3, n_updates=10),
        dict(seed=33, B=6, R=6, micro_batch_size=6, updates=2, n_updates=20, max_grad_norm=1e3),  # the clip idle
        dict(seed=34, B=10, R=12, micro_batch_size=1, updates=2, n_updates=30, lr=3e-3),
    ],
}


def _sources(preset: str, cases: list, bound: float) -> tuple[list, bool]:
    from rlhf_fast.trainers.parity.preset_sources import compare_ppo_max, compare_tldr

    fn = compare_tldr if preset == "tldr" else compare_ppo_max
    rows, ok = [], True
    for case in cases:
        t0 = time.perf_counter()
        r = fn(**case)
        passed = r.ratio <= bound and r.scores_equal
        ok &= passed
        rows.append({"preset": preset, **case, "max_param_diff": r.max_param_diff, "max_param_update": r.max_param_update,
                     "ratio": r.ratio, "scores_equal": r.scores_equal, "grad_norms": list(r.grad_norms),
                     "passed": passed, "seconds": round(time.perf_counter() - t0, 2)})
    return rows, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="run the first two cases only")
    ap.add_argument("--bound", type=float, default=1e-3, help="allowed max |param diff| / max |param update|")
    ap.add_argument("--preset", choices=["lm_human_preferences", "tldr", "ppo_max"], action="append",
                    help="check this preset (repeatable); default: all three")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from rlhf_fast.trainers.parity.preset_vs_upstream import compare_lm_human_preferences

    presets = args.preset or ["lm_human_preferences", "tldr", "ppo_max"]
    rows, ok = [], True
    for preset in presets:
        if preset in SOURCE_CASES:
            cases = SOURCE_CASES[preset]
            more, passed = _sources(preset, cases[:2] if args.quick else cases, args.bound)
            rows.extend(more)
            ok &= passed
    for case in ((CASES[:2] if args.quick else CASES) if "lm_human_preferences" in presets else []):
        t0 = time.perf_counter()
        r = compare_lm_human_preferences(**case)
        lr_ok = len(r.lrs_fast) == len(r.lrs_upstream) and all(
            abs(a - b) <= 1e-12 * max(abs(b), 1e-30) for a, b in zip(r.lrs_fast, r.lrs_upstream))
        kl_ok = all(abs(a - b) <= 1e-6 * abs(b) for a, b in r.kl_coefs)
        passed = r.ratio <= args.bound and r.scores_equal and lr_ok and kl_ok
        ok &= passed
        rows.append({"preset": "lm_human_preferences", **case, "max_param_diff": r.max_param_diff, "max_param_update": r.max_param_update,
                     "ratio": r.ratio, "scores_equal": r.scores_equal, "lrs_equal": lr_ok, "kl_coefs_equal": kl_ok,
                     "passed": passed, "seconds": round(time.perf_counter() - t0, 2)})
    print(json.dumps({"bound": args.bound, "passed": ok, "cases": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
