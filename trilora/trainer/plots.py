"""The pictures: a run's loss curve and confusion matrix, a sweep's trials; PNG files written atomically."""
from __future__ import annotations

import os
from pathlib import Path


def plot_confusion(matrix: list[list[int]], labels: list[str], path: Path) -> None:
    """The confusion matrix (rows: true class, columns: predicted) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(3.0, 0.6 * len(labels) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def plot_losses(history: list[dict], path: Path) -> None:
    """Train and validation loss against step, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    train_pts = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val_pts = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if train_pts:
        ax.plot(*zip(*train_pts), label="train")
    if val_pts:
        ax.plot(*zip(*val_pts), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def plot_sweep(trials: list[dict], metric: str, path: Path) -> None:
    """A sweep as a PNG: left, the metric of each completed trial (the best starred); right, every
    trial's validation loss against step (pruned trials dashed, ending where they were stopped).
    `trials`: rows of `trainer.sweep.trial_rows` ("trial", "status", "value", "val_curve", "best")."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    done = [(i, r) for i, r in enumerate(trials) if r["value"] is not None]
    if done:
        left.plot([i for i, _ in done], [r["value"] for _, r in done], "o", label="complete")
    for i, r in done:
        if r["best"]:
            left.plot([i], [r["value"]], "*", markersize=16, label=f"best: {r['trial']}")
    left.set_xticks(range(len(trials)), [r["trial"].removeprefix("trial-") for r in trials],
                    rotation=90 if len(trials) > 20 else 0)
    left.set_xlabel("trial")
    left.set_ylabel(metric)
    left.grid(alpha=0.3)
    if done:
        left.legend()
    for r in trials:
        if r["val_curve"]:
            style = "--" if r["status"] == "pruned" else "-"
            right.plot(*zip(*r["val_curve"]), style, marker=".", linewidth=2.5 if r["best"] else 1,
                       label=f"{r['trial']} ({r['status']})")
    right.set_xlabel("step")
    right.set_ylabel("validation loss")
    right.grid(alpha=0.3)
    if any(r["val_curve"] for r in trials) and len(trials) <= 12:
        right.legend(fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
