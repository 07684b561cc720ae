"""The run's pictures: the loss curve and the confusion matrix, as PNG files written atomically."""
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
