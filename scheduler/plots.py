"""Reward curves as PNG (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def plot_rewards(curves: Mapping[str, Sequence[Mapping[str, Any]]], out: str | Path,
                 title: str = "mean reward per RL step") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for label, rows in curves.items():
        steps = [m["step"] for m in rows]
        ax.plot(steps, [m["reward_mean"] for m in rows], marker=".", label=label)
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
