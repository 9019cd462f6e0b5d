import os

import numpy as np
from flwr.client import NumPyClient

from fedmq.ftdl import TaskReporter, task_args
from fedmq.ftdl.flower import join
from fedmq.ftdl.reporter import data_fingerprint

args = task_args()
seed = int(args.get("seed", 0))
rng = np.random.default_rng(seed)
true_w = np.array([2.0, -1.0, 0.5])
x = rng.normal(size=(200, 3))
y = x @ true_w + rng.normal(scale=0.01, size=200)
TaskReporter.get().send_data(*data_fingerprint(x, y))  # the run's lineage: what this device trained on


class LinReg(NumPyClient):
    def get_parameters(self, config):
        return [np.zeros(3)]

    def fit(self, parameters, config):
        w = parameters[0].copy()
        for _ in range(int(args["steps"])):
            w -= float(args["lr"]) * 2 * x.T @ (x @ w - y) / len(y)
        return [w], len(y), {"mse": float(np.mean((x @ w - y) ** 2))}

    def evaluate(self, parameters, config):
        mse = float(np.mean((x @ parameters[0] - y) ** 2))
        r2 = 1 - mse / float(np.var(y))
        return mse, len(y), {"r2": r2}


print("client data at", os.environ.get("FEDMQ_DATA_DIR"), flush=True)
join(LinReg())
