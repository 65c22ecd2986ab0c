"""One rank of a 2-rank SFT job for tests/test_faults.py, launched by torchrun:

    torchrun --nproc_per_node 2 tests/_faults_worker.py MODE OUT_DIR ZERO_STAGE [OVERRIDES...]

MODE "run": ``rlhf-fast sft`` with the test's small settings. MODE "kill": the same, 6 steps, and
rank 1 SIGKILLs itself in the middle of step 3 (after its forward, before its backward). MODE
"preempt": the same, but rank 1 alone gets SIGTERM there. MODE "ppo": ``rlhf-fast ppo`` with the
greedy 2-iteration settings of tests/_ppo_dist_worker.py instead (ZERO_STAGE and OVERRIDES apply).
Each rank writes its exit status to OUT_DIR/exit-rankR before it exits.
"""

import os
import signal
import sys
from pathlib import Path

from test_faults import PPO, SFT

from rlhf_fast.cli import main
from rlhf_fast.trainers.sft import SFTTrainer

if __name__ == "__main__":
    mode, out, zero, extra = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
    rank = int(os.environ["RANK"])
    if mode in ("kill", "preempt"):
        extra = ["--sft.max_steps", "6", *extra]
        forward, sig = SFTTrainer.micro_step, signal.SIGKILL if mode == "kill" else signal.SIGTERM

        def micro_step(self, batch):
            out = forward(self, batch)
            if rank == 1 and self.step == 2:
                os.kill(os.getpid(), sig)
            return out

        SFTTrainer.micro_step = micro_step
    if mode == "ppo":
        rc = main(["ppo", *PPO, "--output-dir", str(out), "--ppo.deepspeed.zero_stage", zero, *extra])
    else:
        rc = main([*SFT, "--output-dir", str(out), "--sft.deepspeed.zero_stage", zero, *extra])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"exit-rank{rank}").write_text(str(rc))
    sys.exit(rc)
