"""Plots of a run, for people who would rather look than read (matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_metrics(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss (left) and accuracy (right) per round, every series the run reported."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'fedmq[plot]'") from None
    rounds = [r["round"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("loss", "federated evaluation"), ("central_loss", "held-out test set"),
                       ("train_loss", "training")):
        if any(key in r for r in rows):
            ax_loss.plot(rounds, [r.get(key) for r in rows], marker="o", label=label)
    scores = [("accuracy", "federated evaluation"), ("central_accuracy", "held-out test set")]
    if not any(key in r for key, _ in scores for r in rows):  # a task reporting another score (r2, f1, ...)
        skip = {"round", "examples", "fit_clients", "fit_failures", "eval_clients", "num_examples"}
        scores = [(k, k) for k in sorted({k for r in rows for k in r}) if "loss" not in k and k not in skip]
    for key, label in scores:
        if any(key in r for r in rows):
            ax_acc.plot(rounds, [r.get(key) for r in rows], marker="o", label=label)
    ax_loss.set(title="loss", xlabel="round")
    ax_acc.set(title="accuracy" if scores and "accuracy" in scores[0][0] else "score", xlabel="round", ylim=(0, 1.02))
    for axis in (ax_loss, ax_acc):
        axis.grid(alpha=0.3)
        axis.legend()
        axis.set_xticks(rounds)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
