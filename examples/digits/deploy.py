"""Serve a deployed digits model on this device: load it into the bundle's MLP, measure it on the
device's own held-out part (the 15% of its partition the client validates on, which it never
trained on) and report accuracy, loss and how many examples that took.

The edge runs this for each version it is told to run; the cloud judges the numbers against the
deployment's health expression (``--health 'accuracy >= 0.85'``)."""

import os

from model import evaluate, load_partition, make_model, set_weights

from fedmq.ftdl import TaskReporter
from fedmq.ftdl.reporter import deployed_model

x, y = load_partition(os.environ["FEDMQ_DATA_DIR"])
cut = int(0.85 * len(x))  # as client.py splits it
x_val, y_val = x[cut:], y[cut:]
model = make_model()
set_weights(model, deployed_model())  # a model of another shape fails here: an unhealthy install
loss, accuracy = evaluate(model, x_val, y_val)
TaskReporter.get().send_health({"accuracy": accuracy, "loss": loss, "examples": len(x_val)})
