"""Training curves as PNG files (the paper's Fig. 6 quantities), for one run or several side by side.

    srft-jax plot runs/demo runs/demo-grpo --out runs/compare
"""

from __future__ import annotations

import os
from typing import Sequence

from srft_jax.metrics import read_metrics

# (file stem, title, metric keys plotted on the same axes)
FIGURES = (
    ("reward", "Training reward (rollouts)", ("reward/rollout",)),
    ("accuracy", "Held-out accuracy", ("eval/accuracy",)),
    ("entropy", "Policy entropy", ("rollout/entropy", "demo/entropy")),
    ("response_length", "Rollout response length", ("rollout/length",)),
    ("weights", "Entropy-aware weights", ("demo/w_sft", "rollout/w_rl")),
    ("loss", "Loss terms", ("loss/sft", "loss/rl")),
)


def plot_runs(run_dirs: Sequence[str], out_dir: str) -> list[str]:
    """Writes one PNG per figure (plus `overview.png`) and returns their paths.

    Every run is one line (labelled by its directory name); figures with no data in any run
    are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {os.path.basename(os.path.normpath(d)) or d: read_metrics(d) for d in run_dirs}
    os.makedirs(out_dir, exist_ok=True)
    written = []
    panels = figure_series(runs)
    for stem, title, series in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw(ax, title, series)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{stem}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if panels:
        cols = 3
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        for ax, (_, title, series) in zip(axes.flat, panels):
            _draw(ax, title, series)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(out_dir, "overview.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def figure_series(runs: dict) -> list[tuple[str, str, list]]:
    """[(file stem, title, [(label, [(step, value), ...]), ...])] for the figures with data;
    `runs` maps a run's label to its metrics records."""
    panels = []
    for stem, title, keys in FIGURES:
        series = []
        for run, records in runs.items():
            for key in keys:
                pts = [(r["step"], r[key]) for r in records
                       if isinstance(r.get(key), (int, float)) and _has_source(r, key)]
                if pts:
                    label = run if len(keys) == 1 else f"{run}: {key}"
                    series.append((label, pts))
        if series:
            panels.append((stem, title, series))
    return panels


def _has_source(record: dict, key: str) -> bool:
    """False for a per-source figure (`demo/...`, `rollout/...`) of a step whose batch had no
    tokens of that source (e.g. `demo/entropy` of a GRPO run), which the loss reports as 0."""
    source = key.split("/", 1)[0]
    if source not in ("demo", "rollout"):
        return True
    return record.get(f"{source}/tokens", 1) > 0


def _draw(ax, title, series):
    for label, pts in series:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
