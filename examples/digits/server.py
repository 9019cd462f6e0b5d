"""Federated averaging of the digits MLP; the global model is evaluated on the held-out test set."""

from flwr.server.strategy import FedAvg
from model import evaluate, get_weights, make_model, set_weights, test_split

from fedmq.ftdl import task_args
from fedmq.ftdl.flower import ndarrays_to_parameters, serve, weighted_average

args = task_args()
x_test, y_test = test_split(int(args.get("seed", 0)))
model = make_model()


def central_evaluate(server_round, weights, config):
    set_weights(model, weights)
    loss, accuracy = evaluate(model, x_test, y_test)
    return loss, {"accuracy": accuracy}


strategy = FedAvg(
    min_fit_clients=args["min_clients"], min_evaluate_clients=args["min_clients"],
    min_available_clients=args["min_clients"],
    initial_parameters=ndarrays_to_parameters(get_weights(model)),
    evaluate_fn=central_evaluate,
    fit_metrics_aggregation_fn=weighted_average, evaluate_metrics_aggregation_fn=weighted_average)
serve(strategy, rounds=int(args["rounds"]))
