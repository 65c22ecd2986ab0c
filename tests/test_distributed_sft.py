"""2 processes with ZeRO-2 (torchrun, gloo) follow the same loss curve as 1 process with the same
global batch (there: 2 micro-batches of gradient accumulation). Also runs the ``rlhf-fast``
command end to end, as users do.

Tolerance: every logged loss (train/loss of each of the 6 steps, the final eval/loss) agrees
within 1e-5 relative. Both runs compute the same float32 gradient (the loss is a sum over the
global batch's target tokens divided by their count, whatever the split), summed in a different
order (gloo all-reduce vs local accumulation), so they differ by float32 rounding (~1e-7
relative per step) amplified a little by Adam over 6 steps; a wrong gradient scale (e.g. a
mean of per-rank means, or accumulation not undone) moves the losses by 1e-3 or more.
"""

import os
import socket
import subprocess
import sys

import pytest

from rlhf_fast.trainers.run.metrics_log import read_metrics

ARGS = [
    "--sft.model.size", "test", "--sft.model.config_overrides", "{}", "--sft.batch_size", "16",
    "--sft.micro_batch_size", "8", "--sft.max_steps", "6", "--sft.data.max_train_examples", "256",
    "--sft.data.max_eval_examples", "64", "--sft.eval_batch_size", "16", "--sft.logging.log_every", "1",
    "--sft.logging.tensorboard", "false", "--sft.logging.progress_bar", "false", "--sft.deepspeed.zero_stage", "2",
    "--sft.optim.lr", "3e-3",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(cmd, timeout=420):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_ranks_zero2_match_one_rank(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "rlhf_fast.cli", "sft", "--output-dir", str(one), *ARGS])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
          "-m", "rlhf_fast.cli", "sft", "--output-dir", str(two), *ARGS])
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=1e-5), ra["step"]
        assert rb["train/tokens"] == ra["train/tokens"]  # the same global batches
    assert b[-1]["eval/loss"] == pytest.approx(a[-1]["eval/loss"], rel=1e-5)
    assert a[-1]["train/loss"] < a[0]["train/loss"]
    assert (two / "model" / "config.json").is_file()
    latest = two / "checkpoints" / (two / "checkpoints" / "latest").read_text().strip()
    assert len(list(latest.glob("deepspeed/state/*optim_states.pt"))) == 2  # ZeRO-2: one shard per rank
    # a second 2-rank run on the directory: refused on every rank (rank 0 takes the lock and decides,
    # the ranks agree), promptly and with one line, not a hang of the rank that was not told
    assert (two / ".rlhf_fast.lock").read_text() == ""  # released
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "rlhf_fast.cli", "sft", "--output-dir", str(two), *ARGS],
                          env=_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0 and "holds a previous sft run" in proc.stderr, proc.stderr[-2000:]
