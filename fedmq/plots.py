"""Plots of a run, for people who would rather look than read (matplotlib, imported lazily)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Per-round counts, not measures of the model: not plotted as scores.
COUNTS = frozenset({"round", "examples", "fit_clients", "fit_failures", "eval_clients", "num_examples",
                    "eval_examples"})


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plots need matplotlib: pip install 'fedmq[plot]'") from None
    return plt


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_metrics(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Loss (left) and accuracy (right) per round, every series the run reported."""
    plt = _pyplot()
    rounds = [r["round"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("loss", "federated evaluation"), ("central_loss", "held-out test set"),
                       ("train_loss", "training")):
        if any(key in r for r in rows):
            ax_loss.plot(rounds, [r.get(key) for r in rows], marker="o", label=label)
    scores = [("accuracy", "federated evaluation"), ("central_accuracy", "held-out test set")]
    if not any(key in r for key, _ in scores for r in rows):  # a task reporting another score (r2, f1, ...)
        scores = [(k, k) for k in sorted({k for r in rows for k in r}) if "loss" not in k and k not in COUNTS]
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


def plot_comparison(runs: list[tuple[str, list[dict[str, Any]]]], path: Path, title: str) -> None:
    """Several runs' per-round curves overlaid: one panel per metric any of them reported (loss,
    accuracy, r2, ...; counts left out), one line per run, labelled ``TASK:RUN``."""
    plt = _pyplot()
    names = sorted({k for _, rows in runs for r in rows for k, v in r.items() if _number(v)} - COUNTS,
                   key=lambda k: ("loss" not in k, k))  # the losses first
    columns = max(1, min(3, len(names)))
    lines = max(1, math.ceil(len(names) / columns))
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), squeeze=False)
    panels = [axis for line in axes for axis in line]
    for axis, name in zip(panels, names, strict=False):
        for index, (label, rows) in enumerate(runs):
            points = [(r["round"], r[name]) for r in rows if _number(r.get(name)) and _number(r.get("round"))]
            if points:  # a run keeps its colour in every panel
                axis.plot(*zip(*points, strict=True), marker="o", label=label, color=f"C{index % 10}")
        axis.set(title=name, xlabel="round")
        axis.xaxis.get_major_locator().set_params(integer=True)  # rounds are whole
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    for axis in panels[len(names):]:
        axis.axis("off")
    if not names:
        panels[0].text(0.5, 0.5, "no per-round metrics in these runs", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
