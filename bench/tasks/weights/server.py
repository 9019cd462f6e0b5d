import numpy as np
from flwr.server.strategy import FedAvg

from fedmq.ftdl import task_args
from fedmq.ftdl.flower import ndarrays_to_parameters, serve, weighted_average

args = task_args()
strategy = FedAvg(
    min_fit_clients=args["min_clients"], min_evaluate_clients=args["min_clients"],
    min_available_clients=args["min_clients"],
    initial_parameters=ndarrays_to_parameters([np.zeros(int(args["params"]), dtype=np.float32)]),
    fit_metrics_aggregation_fn=weighted_average, evaluate_metrics_aggregation_fn=weighted_average)
serve(strategy, rounds=args["rounds"])
