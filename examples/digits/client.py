"""A device's side: train the MLP on this device's partition, evaluate on a local held-out part."""

import os
import time

from flwr.client import NumPyClient
from model import evaluate, get_weights, load_partition, make_model, set_weights, train

from fedmq.ftdl import TaskReporter, task_args
from fedmq.ftdl.flower import join
from fedmq.ftdl.reporter import data_fingerprint

args = task_args()
x, y = load_partition(os.environ["FEDMQ_DATA_DIR"])
cut = int(0.85 * len(x))
(x_train, y_train), (x_val, y_val) = (x[:cut], y[:cut]), (x[cut:], y[cut:])
TaskReporter.get().send_info(samples=len(x), train=len(x_train), validation=len(x_val))
# Lineage: a digest of what this device trains on (the data stays here), in both modes.
TaskReporter.get().send_data(*data_fingerprint(x_train, y_train))
model = make_model()


class DigitsClient(NumPyClient):
    def get_parameters(self, config):
        return get_weights(model)

    def fit(self, parameters, config):
        time.sleep(float(args.get("delay_s", 0)))  # simulates a slow device (tests, demos)
        set_weights(model, parameters)
        loss = train(model, x_train, y_train, epochs=int(args["epochs"]), lr=float(args["lr"]),
                     batch_size=int(args["batch_size"]))
        return get_weights(model), len(x_train), {"loss": loss}

    def evaluate(self, parameters, config):
        set_weights(model, parameters)
        loss, accuracy = evaluate(model, x_val, y_val)
        return loss, len(x_val), {"accuracy": accuracy}


join(DigitsClient())
