import numpy as np
from flwr.server.strategy import FedAvg

from fedmq.ftdl import TaskReporter, task_args
from fedmq.ftdl.flower import ndarrays_to_parameters, serve, weighted_average

args = task_args()
reporter = TaskReporter.get()
if args.get("fire_triggers"):
    reporter.trigger("note", "round-zero", "42")
    reporter.trigger("not-declared", "x")
strategy = FedAvg(
    min_fit_clients=args["min_clients"], min_evaluate_clients=args["min_clients"],
    min_available_clients=args["min_clients"],
    initial_parameters=ndarrays_to_parameters([np.zeros(3, dtype=np.float64)]),
    fit_metrics_aggregation_fn=weighted_average, evaluate_metrics_aggregation_fn=weighted_average)
serve(strategy, rounds=args["rounds"])
