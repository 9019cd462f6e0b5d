"""A plain Flower server: the task itself is healthy on the cloud, only its clients fail."""

from flwr.server.strategy import FedAvg

from fedmq.ftdl import task_args
from fedmq.ftdl.flower import serve

args = task_args()
serve(FedAvg(min_available_clients=args["min_clients"]), rounds=int(args["rounds"]))
