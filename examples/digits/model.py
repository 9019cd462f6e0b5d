"""The digits model and data helpers, shared by the server and the client of this bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

torch.set_num_threads(1)  # several task processes share small devices


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [p.detach().cpu().numpy().copy() for p in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    keys = list(model.state_dict().keys())
    model.load_state_dict({k: torch.tensor(w) for k, w in zip(keys, weights, strict=True)}, strict=True)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(x, dtype=torch.float32))
        loss = nn.functional.cross_entropy(logits, torch.tensor(y, dtype=torch.long)).item()
        accuracy = (logits.argmax(1).numpy() == y).mean().item()
    return float(loss), float(accuracy)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch_size: int) -> float:
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    generator = torch.Generator().manual_seed(len(x))
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), batch_size):
            batch = order[start:start + batch_size]
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[batch]), yt[batch])
            loss.backward()
            optimiser.step()
    return float(loss.item())


def load_partition(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(Path(data_dir) / "train.npz")
    return data["x"].astype(np.float32), data["y"].astype(np.int64)


def test_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The held-out 20% of the digits that no device trains on (see prepare.py)."""
    from prepare import split

    return split(seed)[1]
