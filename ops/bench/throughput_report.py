"""The throughput benchmark's tables (rich) and plots (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from throughput_config import BASE_MODEL, DEVICE, Run


# ---- output --------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summary_table(meds: dict[str, dict[str, Any]], n: int, repeats: int) -> Any:
    from rich.table import Table

    t = Table(title=f"Throughput, N={n} experiments (median of {repeats}; min..max)")
    for col in ("mode", "W", "makespan s", "exp/hour", "rollout tok/s", "train tok/s", "busy",
                "not compute", "idle (queue)", "mean train batch", "rollout ms/exp-step",
                "train ms/exp-step", "start-up s"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for mode, m in meds.items():
        t.add_row(mode, str(m["workers"]),
                  f"{m['makespan_s']:.1f} ({m['makespan_s_min']:.1f}..{m['makespan_s_max']:.1f})",
                  f"{m['experiments_per_hour']:.0f}", f"{m['rollout_tokens_per_s']:.0f}",
                  f"{m['train_tokens_per_s']:.0f}", f"{m['busy_fraction']:.1%}", f"{m['overhead']:.1%}",
                  "-" if m["idle_fraction"] is None else f"{m['idle_fraction']:.1%}",
                  f"{m['mean_train_batch']:.1f}", f"{m['rollout_ms_per_exp_step']:.1f}",
                  f"{m['train_ms_per_exp_step']:.1f}", fmt(m["startup_s"]))
    return t


def profile_table(profiles: dict[str, dict[str, Any]], cold: dict[str, Any] | None) -> Any:
    from rich.table import Table

    t = Table(title="Where worker time goes (share of W x makespan, median over repeats; from the "
                    "lf:worker_tasks records)")
    for col in ("mode", "compute (rollout+train)", "rest of Celery tasks", "idle between tasks",
                "of which work pending", "tasks"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for mode, p in profiles.items():
        if p:
            t.add_row(mode, f"{p['compute_s']:.1%}", f"{p['in_task_other_s']:.1%}", f"{p['idle_s']:.1%}",
                      f"{p['idle_pending_s']:.1%}", f"{p['tasks']:.0f}")
    if cold:
        s = cold["per_experiment_mean_s"]
        t.caption = (f"cold-solo per experiment (mean s): process {s['process_wall_s']:.2f} = interpreter "
                     f"{s['interpreter_s']:.2f} + imports {s['import_s']:.2f} + model load {s['load_s']:.2f}"
                     f" + train {s['train_s']:.2f} + save {s['save_s']:.2f}")
    return t


def trace_table(traces: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="Between two tasks on a worker (Redis MONITOR trace run, W=1; median ms, sum as "
                    "share of makespan)")
    for col in ("mode", "tasks", "makespan s", "idle gap", "reaction: commit->publish",
                "delivery: publish->claim", "wind-down: commit->task end", "sched ticks/s"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for x in traces:
        def cell(k: str, x: dict[str, Any] = x) -> str:
            return f"{x.get(f'{k}_median_ms', float('nan')):.1f} ({x[f'{k}_sum_s'] / x['makespan_s']:.1%})"

        t.add_row(x["mode"], str(x["tasks"]), f"{x['makespan_s']:.1f}", cell("gap"), cell("reaction"),
                  cell("delivery"), cell("wind_down"), f"{x['scheduler_ticks_per_s']:.0f}")
    return t


def parity_table(rows: list[dict[str, Any]], modes: list[str], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("experiment")
    for mode in modes:
        t.add_column(f"final {mode}", justify="right")
    keys = list(rows[0]["diff"]) if rows else []
    for key in keys:
        t.add_column(f"Δ {key} (tol)", justify="right")
    for r in rows:
        cells = [f"{r['final'][m]:.3f}" for m in modes]
        cells += [f"{'' if abs(r['diff'][k]) <= r['tol'][k] else '[red]'}{r['diff'][k]:+.3f} "
                  f"({r['tol'][k]:.3f})" for k in keys]
        t.add_row(r["name"], *cells)
    return t


def sweep_table(sweep: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="Scaling sweep: experiments/hour vs N")
    for col in ("mode", "N", "makespan s", "exp/hour", "busy", "mean train batch", "source"):
        t.add_column(col, justify="left" if col in ("mode", "source") else "right")
    for s in sweep:
        t.add_row(s["mode"], str(s["n"]), f"{s['makespan_s']:.1f}", f"{s['experiments_per_hour']:.0f}",
                  f"{s['busy_fraction']:.1%}", f"{s['mean_train_batch']:.1f}", s["source"])
    return t


def bars_table(bars: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="Bars")
    for col in ("bar", "measured", "verdict"):
        t.add_column(col)
    for b in bars:
        verdict = "[green]PASS[/]" if b["pass"] else "[red]MISS[/]"
        t.add_row(b["bar"], b["measured"], verdict)
    return t


def plot_bars(meds: dict[str, dict[str, Any]], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(meds)
    vals = [meds[m]["experiments_per_hour"] for m in modes]
    lo = [v - meds[m]["experiments_per_hour_min"] for v, m in zip(vals, modes, strict=True)]
    hi = [meds[m]["experiments_per_hour_max"] - v for v, m in zip(vals, modes, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = ["#999999", "#6a8caf", "#2c7a3f", "#1b5e20", "#0d3d12"][: len(modes)]
    ax.bar(modes, vals, yerr=[lo, hi], capsize=4, color=colors)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.0f}\n({v / vals[0]:.1f}x cold)", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("experiments / hour (median, min..max)")
    ax.set_title(f"{n} RL experiments x {meds[modes[0]].get('steps', '')} steps, {BASE_MODEL} on {DEVICE}")
    ax.set_ylim(0, max(vals) * 1.25)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_rewards(runs: dict[str, Run], extra: dict[str, Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["name"] for e in next(iter(runs.values())).experiments]
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False, sharey=True)
    styles = ["-", "--", "-.", ":", "-"]
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        for j, (label, run) in enumerate([*runs.items(), *extra.items()]):
            ys = [m["reward_mean"] for m in run.experiments[i]["metrics"]]
            ax.plot(range(len(ys)), ys, styles[j % len(styles)], label=label, alpha=0.8, lw=1.3)
        ax.set_title(name, fontsize=8)
        ax.grid(alpha=0.3)
    for k in range(len(names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=6)
    fig.supxlabel("RL step")
    fig.supylabel("mean reward")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(sweep: list[dict[str, Any]], cold_eph: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for mode in dict.fromkeys(s["mode"] for s in sweep):
        pts = sorted((s["n"], s["experiments_per_hour"]) for s in sweep if s["mode"] == mode)
        ax.plot(*zip(*pts, strict=True), marker="o", label=mode)
    if cold_eph:
        ax.axhline(cold_eph, color="grey", ls="--", label="cold-solo (main runs)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experiments N (submitted at once for the fleet)")
    ax.set_ylabel("experiments / hour")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
