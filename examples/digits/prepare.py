"""Partition scikit-learn's handwritten digits (1,797 real 8x8 images, shipped with the package)
across devices: ``python prepare.py OUT --devices 2`` writes ``OUT/<device>/train.npz`` and
``meta.json`` (``samples``, which the edge agent reports as its data quantity).  The same seed
keeps the server's held-out test set disjoint from every device's data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def split(seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return (x[train], y[train]), (x[test], y[test])


def write_partitions(out: Path, devices: list[str], seed: int = 0) -> dict[str, int]:
    (x, y), _ = split(seed)
    sizes = {}
    for device, part in zip(devices, np.array_split(np.arange(len(x)), len(devices)), strict=True):
        folder = out / device
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "train.npz", x=x[part], y=y[part])
        (folder / "meta.json").write_text(json.dumps({"samples": len(part), "dataset": "sklearn-digits"}))
        sizes[device] = len(part)
    return sizes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", nargs="+", default=["dev-1", "dev-2"])
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    print(json.dumps(write_partitions(opts.out, opts.devices, opts.seed)))
