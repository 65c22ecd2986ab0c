"""PNG plots of a run's metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

PPO_PANELS = [
    ("eval/gold_score", "gold score (held-out prompts)"),
    ("eval/score", "reward-model score (held-out prompts)"),
    ("objective/scores", "reward-model score (rollouts)"),
    ("objective/kl", "KL to the reference (nats / sequence)"),
    ("kl_coef", "KL coefficient beta"),
    ("policy/clipfrac", "policy clip fraction"),
]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_ppo_metrics(metrics_path, out_dir) -> list[Path]:
    """One PNG with a panel per PPO metric that the run logged (gold score, reward-model score,
    KL, ...) plus one PNG per panel; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in Path(metrics_path).read_text().splitlines() if ln.strip()]
    panels = [(k, t) for k, t in PPO_PANELS if _series(rows, k)[0]]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if not panels:
        return paths
    cols = min(3, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, panels):
        x, y = _series(rows, key)
        ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    paths.append(out / "ppo_summary.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    for key, title in panels:
        x, y = _series(rows, key)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(x, y, marker="o" if len(x) < 30 else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / (key.replace("/", "_") + ".png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
