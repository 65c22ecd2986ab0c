"""Runs rlhf_fast's PPOTrainer (``rlhf_fast/trainers/ppo.py``, what ``rlhf-fast ppo`` runs) for a few
iterations with the settings of ``benchmarks/peer_trl_ppo.py`` and writes per-iteration timings as
JSON. Started by peer_trl_ppo.py in its own process (this repository's venv); imported by nothing
else, never collected by pytest and never run in CI.

    python rlhf_fast_ppo_runner.py SPEC.json OUT.json

SPEC: as ``peers/trl_ppo_runner.py`` reads it, plus ``overrides`` (the ``--ppo.*`` command-line
overrides peer_trl_ppo.py built; the record lists them).

Timing: ``iteration`` is the wall time between the ends of consecutive ``run_step`` calls (the
first from the start of ``fit``), so it holds the trainer loop's own per-iteration work (metrics,
samples.jsonl) as TRL's does; the phases are the trainer's own ``time/<phase>_s`` metrics
(``PPOTrainer.run_step``): generate, score, logprobs, advantages, train. ``rollout`` = generate +
score + logprobs + advantages (TRL's ``torch.no_grad()`` block), ``update`` = train.

``skip_final_save`` in SPEC (``benchmarks/peer_trl_grid.py``): no checkpoint, final model or plots
after the last iteration. They come after the last timed iteration anyway (TRL's runner saves nothing
either); at 0.2 B parameters they are gigabytes written per run.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers

    import rlhf_fast
    from rlhf_fast.config import load_config
    from rlhf_fast.trainers.ppo import PPOTrainer

    t_load = time.perf_counter()
    cfg = load_config(overrides=spec["overrides"])
    trainer = PPOTrainer(cfg.ppo, spec["work_dir"] + "/rlhf_fast_out")
    marks: list[dict] = []
    last = {"t": None}
    orig = trainer.run_step

    def timed_step():
        if last["t"] is None:
            last["t"] = time.perf_counter()
        row = orig()
        row["_end"] = time.perf_counter()
        marks.append(row)
        return row

    trainer.run_step = timed_step
    if spec.get("skip_final_save"):  # after the last timed iteration: not measured, only skipped
        trainer._checkpoint = trainer._write_final_model = trainer.on_complete = lambda: None
    load_s = time.perf_counter() - t_load
    t0 = time.perf_counter()
    last["t"] = t0
    trainer.fit()
    train_s = time.perf_counter() - t0
    iters, prev = [], t0
    for row in marks:
        ph = {k[len("time/"):-2]: float(v) for k, v in row.items() if k.startswith("time/") and k.endswith("_s")}
        rollout = sum(ph.get(k, 0.0) for k in ("generate", "score", "logprobs", "advantages"))
        iters.append({"iteration_s": row["_end"] - prev, "core_s": float(row["perf/iteration_s"]),
                      "rollout_s": rollout, "update_s": ph.get("train", 0.0), "generate_s": ph.get("generate", 0.0),
                      "resp_len_mean": row.get("objective/response_length"), "phases": ph})
        prev = row["_end"]
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"impl": "rlhf_fast", "iterations": iters, "load_s": load_s, "train_s": train_s,
           "peak_rss_mb_self": rss_kb / 1024, "torch_threads": torch.get_num_threads(),
           "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                        "rlhf_fast": getattr(rlhf_fast, "__version__", None),
                        "transformers": transformers.__version__,
                        "deepspeed": __import__("deepspeed").__version__},
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "last_metrics": {k: v for k, v in marks[-1].items() if not k.startswith("_")} if marks else {}}
    json.dump(out, open(out_path, "w"), indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
