"""Aggregation of the round's updates: FedAvg weighted by example counts, in numpy, or any
function of the same shape a task brings (``join(..., aggregate=fn)`` or ``{"aggregate": name}``).

An aggregation function takes ``[(arrays, num_examples), ...]`` (one entry per accepted update,
every entry with the same shapes and dtypes, checked before) and returns the new global arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Update = tuple[list[np.ndarray], int]
AggregateFn = Callable[[Sequence[Update]], list[np.ndarray]]


def fedavg(updates: Sequence[Update]) -> list[np.ndarray]:
    """The example-weighted mean of each array (computed in float64, returned in its own dtype)."""
    if not updates:
        raise ValueError("nothing to aggregate")
    total = sum(n for _, n in updates)
    weights = [n / total for _, n in updates] if total > 0 else [1 / len(updates)] * len(updates)
    out = []
    for index, first in enumerate(updates[0][0]):
        mean = sum(w * arrays[index].astype(np.float64) for (arrays, _), w in zip(updates, weights, strict=True))
        mean = np.asarray(mean)
        out.append(np.rint(mean).astype(first.dtype) if first.dtype.kind in "iub" else mean.astype(first.dtype))
    return out


AGGREGATORS: dict[str, AggregateFn] = {"fedavg": fedavg}


def resolve(choice: str | AggregateFn | None) -> AggregateFn:
    if choice is None:
        return fedavg
    if callable(choice):
        return choice
    if choice not in AGGREGATORS:
        raise ValueError(f"unknown aggregation {choice!r} (known: {', '.join(sorted(AGGREGATORS))})")
    return AGGREGATORS[choice]


def weighted_average(metrics: Sequence[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Average each numeric metric over participants (Flower clients, in Flower mode), weighted by
    their example counts."""
    total = sum(n for n, _ in metrics) or 1
    keys = {k for _, m in metrics for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {k: sum(n * float(m.get(k, 0.0)) for n, m in metrics) / total for k in sorted(keys)}
