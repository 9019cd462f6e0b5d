"""Each round moves every weight a little toward this device's own target: the work is O(N) and
small, so a round's time is the transport of N weights each way (Flower gRPC or MQTT blobs)."""

import numpy as np
from flwr.client import NumPyClient

from fedmq.ftdl import task_args
from fedmq.ftdl.flower import join

args = task_args()
params = int(args["params"])
target = np.random.default_rng(int(args.get("seed", 0))).normal(size=params).astype(np.float32)


class Weights(NumPyClient):
    def get_parameters(self, config):
        return [np.zeros(params, dtype=np.float32)]

    def fit(self, parameters, config):
        w = parameters[0] + 0.5 * (target - parameters[0])
        return [w.astype(np.float32)], 100, {"distance": float(np.abs(target - w).mean())}

    def evaluate(self, parameters, config):
        loss = float(np.square(target - parameters[0]).mean())
        return loss, 100, {"accuracy": 1.0 / (1.0 + loss)}


join(Weights())
