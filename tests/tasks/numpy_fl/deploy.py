"""Serve a deployed linear model here: load it, measure it on this device's data, say how it did.

The data is the client's (same seed, same draw), so a model trained by this task scores r2 near 1;
a model of another shape fails here, as it would fail serving."""

import numpy as np

from fedmq.ftdl import TaskReporter, task_args
from fedmq.ftdl.reporter import deployed_model

args = task_args()
rng = np.random.default_rng(int(args.get("seed", 0)))
true_w = np.array([2.0, -1.0, 0.5])
x = rng.normal(size=(200, 3))
y = x @ true_w + rng.normal(scale=0.01, size=200)
(w,) = deployed_model()
mse = float(np.mean((x @ w - y) ** 2))
TaskReporter.get().send_health({"r2": 1 - mse / float(np.var(y)), "loss": mse, "examples": len(y)})
