#!/usr/bin/env python
"""Held-out check: PPO updates under ``--preset lm_human_preferences`` against the float64
re-derivation of openai/lm-human-preferences' update (``rlhf_fast.trainers.parity.preset_vs_upstream``), on
cases the test suite does not run: several seeds, bigger batches, more minibatches and epochs,
micro-batching on and off, more updates of a longer run.

    python scripts/check_preset_parity.py            # all cases, JSON report on stdout
    python scripts/check_preset_parity.py --quick    # the first two cases

Exit status 1 when a case's parameter difference exceeds ``--bound`` (default 1e-3, the issue's
bound) times its largest parameter update, when the scores or the lr of any optimizer step
differ, or when the KL coefficients drift apart.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="run the first two cases only")
    ap.add_argument("--bound", type=float, default=1e-3, help="allowed max |param diff| / max |param update|")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from rlhf_fast.trainers.parity.preset_vs_upstream import compare_lm_human_preferences

    rows, ok = [], True
    for case in CASES[:2] if args.quick else CASES:
        t0 = time.perf_counter()
        r = compare_lm_human_preferences(**case)
        lr_ok = len(r.lrs_fast) == len(r.lrs_upstream) and all(
            abs(a - b) <= 1e-12 * max(abs(b), 1e-30) for a, b in zip(r.lrs_fast, r.lrs_upstream))
        kl_ok = all(abs(a - b) <= 1e-6 * abs(b) for a, b in r.kl_coefs)
        passed = r.ratio <= args.bound and r.scores_equal and lr_ok and kl_ok
        ok &= passed
        rows.append({**case, "max_param_diff": r.max_param_diff, "max_param_update": r.max_param_update,
                     "ratio": r.ratio, "scores_equal": r.scores_equal, "lrs_equal": lr_ok, "kl_coefs_equal": kl_ok,
                     "passed": passed, "seconds": round(time.perf_counter() - t0, 2)})
    print(json.dumps({"bound": args.bound, "passed": ok, "cases": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
