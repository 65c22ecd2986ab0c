"""What a user watches during PPO: the progress bar's numbers and sample completions.

The score PPO trains on includes the missing-stop penalty (``generation.missing_stop_penalty``:
lm-human-preferences and N+ replace the score of a response without a stop token by -1), so a
policy that rarely stops shows "score -1.0" however good its text is. The bar therefore shows the
share of rollouts without a stop token and the reward's own score next to it, and
``DIR/samples.jsonl`` shows the responses themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from rlhf_fast.trainers.run.atomic_files import atomic_write_text

SAMPLES_FILE = "samples.jsonl"


def ppo_postfix(row: dict) -> dict:
    """The PPO progress bar's fields from an iteration's metrics row: the trained-on score, the
    share of rollouts without a stop token and the raw (reward model / function) score, KL, tokens/s."""
    out = {"score": f"{row['objective/scores']:.3f}"}
    if "objective/missing_stop_frac" in row:
        out["no_stop"] = f"{row['objective/missing_stop_frac']:.0%}"
    if "objective/raw_scores" in row:
        out["raw"] = f"{row['objective/raw_scores']:.3f}"
    out["kl"] = f"{row['objective/kl']:.3f}"
    if "perf/tokens_per_s" in row:
        out["tok_s"] = f"{row['perf/tokens_per_s']:.0f}"
    return out


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


class SampleLogger:
    """A few rollouts per PPO iteration: one JSON object per row in ``DIR/samples.jsonl``
    (``{"iteration", "prompt", "response", "score", "raw_score", "stopped"}``; ``score`` is what PPO
    trained on, after the missing-stop penalty; ``raw_score`` the reward model's or function's;
    ``stopped`` whether the response ended at a stop token) and a TensorBoard text table under
    "samples" (through ``metrics``, a ``MetricsLogger``). Rank 0 only; ``rows`` 0 writes nothing.
    ``resume_from(iteration)`` drops the rows after ``iteration``, as ``MetricsLogger`` does."""

    def __init__(self, output_dir, *, rows: int, enabled: bool, metrics=None):
        self.path = Path(output_dir) / SAMPLES_FILE
        self.rows = rows
        self.enabled = enabled and rows > 0
        self.metrics = metrics

    def resume_from(self, iteration: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a partial last line (killed mid-append)
                continue
            if isinstance(row, dict) and row.get("iteration", 0) <= iteration:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept))

    def log(self, iteration: int, tokenizer, prompts: Sequence[str], responses: torch.Tensor,
            response_mask: torch.Tensor, scores: torch.Tensor, raw_scores: Optional[torch.Tensor] = None,
            stopped: Optional[torch.Tensor] = None, turns: Optional[list] = None) -> list[dict]:
        """Writes the first ``rows`` rollouts; ``responses`` / ``response_mask``: (B, R) token ids
        and the mask of the kept (truncated) tokens; ``scores`` / ``raw_scores`` / ``stopped``: (B,).
        ``turns`` (multi-turn episodes): per row the segments ``{"role", "start", "end"}``; the row
        then also holds ``"turns"``: ``[{"role": "model" | "env", "text"}]`` (a model turn followed
        by an "env" one was answered by the environment: a tool call and its reply), and its
        response marks each segment ``[model]`` / ``[env]``."""
        if not self.enabled:
            return []
        n = min(self.rows, len(prompts))
        ids = torch.where(response_mask[:n], responses[:n], tokenizer.pad_token_id).cpu()
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        out = []
        for i in range(n):
            row = {"iteration": int(iteration), "prompt": prompts[i], "response": texts[i],
                   "score": float(scores[i])}
            if turns is not None:
                row["turns"] = [{"role": seg["role"], "text": tokenizer.decode(ids[i, seg["start"]:seg["end"]].tolist(),
                                                                            skip_special_tokens=False)}
                                for seg in turns[i]]
                row["response"] = " ".join(f"[{t['role']}] {t['text']}" for t in row["turns"])
            if raw_scores is not None:
                row["raw_score"] = float(raw_scores[i])
            if stopped is not None:
                row["stopped"] = bool(stopped[i])
            out.append(row)
        with self.path.open("a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in out))
        if self.metrics is not None:
            head = "| prompt | response | score | raw score | stopped |\n|---|---|---|---|---|\n"
            body = "".join(f"| {_cell(r['prompt'])} | {_cell(r['response'])} | {r['score']:.3f} | "
                           f"{r.get('raw_score', float('nan')):.3f} | {r.get('stopped', '')} |\n" for r in out)
            self.metrics.log_text("samples", head + body, iteration)
        return out
