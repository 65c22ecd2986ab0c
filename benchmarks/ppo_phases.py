"""One PPOTrainer iteration broken down by phase, and the update by model part: wall and thread-CPU ms.

    python benchmarks/ppo_phases.py ARTEFACTS OUTDIR ITERATIONS [rlhf-fast ppo overrides ...]

ARTEFACTS: a ``rlhf-fast pipeline`` output directory (its ``sft/model`` is the policy, its
``rm/model`` the reward model and the critic's start). The default setting is issue 23's
comparison with TRL's PPOTrainer: B = 64 prompts, R = 48 new tokens (EOS stops), 2 minibatches,
4 epochs, a separate critic from the reward model; run with OMP_NUM_THREADS=1. Phases are
PPOTrainer's ``time/*_s`` (trainers/ppo.py ``run_step``); inside them the policy / reference
``Policy.logprobs``, the critic's forward, each DeepSpeed engine's backward and optimizer step
are timed by wrapping those methods. On a shared machine the thread-CPU time is the steadier
figure; the table gives both per iteration and the best over iterations >= 1 (iteration 0
warms up). Also printed: each iteration's mean response length and the longest response of
each update micro-batch (what ``algo.trim_padding`` trims to). Writes OUTDIR/prof.json.
"""
import json
import sys
import time
from collections import defaultdict

import torch

from rlhf_fast.cli import parse
from rlhf_fast.models import Critic, Policy
from rlhf_fast.trainers import ppo_core
from rlhf_fast.trainers import ppo as ppo_mod

A, out, iters, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
argv = ["ppo", "--policy.path", f"{A}/sft/model", "--reward.model_path", f"{A}/rm/model",
        "--generation.max_new_tokens", "48", "--algo.num_minibatches", "2", "--iterations", str(iters),
        "--logging.eval_every", "0", "--logging.save_every", "0", "--logging.progress_bar", "false",
        "--output-dir", out, "--overwrite"] + extra
cmd, cfg, args = parse(argv)

T = defaultdict(lambda: [0.0, 0.0])  # name -> [wall, cpu] for the current iteration
per_iter = []
ctx = ["?"]
lengths = []


class timed:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.w, self.c = time.perf_counter(), time.thread_time()

    def __exit__(self, *a):
        n = f"{ctx[0]}/{self.name}"
        T[n][0] += time.perf_counter() - self.w
        T[n][1] += time.thread_time() - self.c


def wrap(obj, attr, name):
    f = getattr(obj, attr)

    def g(*a, **k):
        with timed(name):
            return f(*a, **k)

    setattr(obj, attr, g)


wrap(Policy, "logprobs", "policy_fwd")
wrap(Critic, "forward", "critic_fwd")
f_bw = ppo_core.DeepSpeedStepper.backward


def bw(self, loss):
    with timed("critic_bwd" if isinstance(self.module, Critic) else "policy_bwd"):
        return f_bw(self, loss)


ppo_core.DeepSpeedStepper.backward = bw
f_st = ppo_core.DeepSpeedStepper.step


def st(self):
    with timed("critic_step" if isinstance(self.module, Critic) else "policy_step"):
        return f_st(self)


ppo_core.DeepSpeedStepper.step = st
f_ml = ppo_core._micro_loss


def ml(p, c, micro, *a, **k):
    m = micro.response_mask
    lengths.append(int(m.any(0).nonzero().max()) + 1 if m.any() else 0)
    return f_ml(p, c, micro, *a, **k)


ppo_core._micro_loss = ml

# phases: the trainer's _Timer
orig_call = ppo_mod._Timer.__call__


def tcall(self, name):
    inner = orig_call(self, name)

    class C:
        def __enter__(s):
            ctx[0] = name
            s.w, s.c = time.perf_counter(), time.thread_time()
            inner.__enter__()

        def __exit__(s, *e):
            inner.__exit__(*e)
            T[f"{name}/total"][0] += time.perf_counter() - s.w
            T[f"{name}/total"][1] += time.thread_time() - s.c
            ctx[0] = "?"

    return C()


ppo_mod._Timer.__call__ = tcall

orig_run = ppo_mod.PPOTrainer.run_step


def run_step(self):
    T.clear()
    lengths.clear()
    w, c = time.perf_counter(), time.thread_time()
    row = orig_run(self)
    T["iteration/total"] = [time.perf_counter() - w, time.thread_time() - c]
    per_iter.append({"T": dict(T), "micro_len": list(lengths), "resp_len": row["objective/response_length"],
                     "metrics": {k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))}})
    return row


ppo_mod.PPOTrainer.run_step = run_step
t = ppo_mod.PPOTrainer(cfg.ppo, out, overwrite=True)
t.fit()
json.dump(per_iter, open(f"{out}/prof.json", "w"))
keys = sorted({k for it in per_iter for k in it["T"]})
print(f"{'phase':28s} " + " ".join(f"it{i}".rjust(13) for i in range(len(per_iter))) + "   best(w/cpu ms, it>=1)")
for k in keys:
    vals = [it["T"].get(k, [0, 0]) for it in per_iter]
    best_w = min(v[0] for v in vals[1:]) if len(vals) > 1 else vals[0][0]
    best_c = min(v[1] for v in vals[1:]) if len(vals) > 1 else vals[0][1]
    print(f"{k:28s} " + " ".join(f"{v[0]*1e3:6.0f}/{v[1]*1e3:6.0f}" for v in vals) + f"   {best_w*1e3:7.0f}/{best_c*1e3:7.0f}")
for i, it in enumerate(per_iter):
    print(i, "resp_len", round(it["resp_len"], 2), "micro max len", it["micro_len"][:8])
