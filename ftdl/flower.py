"""Flower helpers: the only module of fedmq that calls Flower's API.

A task author writes plain Flower code -- a ``Strategy`` on the server, a ``NumPyClient`` on the
client -- and calls ``serve`` or ``join``.  These wrap them so every round's aggregated metrics
and progress reach the reporter without a line of reporting code, and the final global model is
saved where the cloud collects it.

Flower's legacy ``start_server``/``start_client`` (deprecated since 1.13, working in the tested
1.41-1.42 range) are used here and nowhere else, so moving to SuperLink/SuperNode is a change to
this one file.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import flwr as fl
import grpc
import numpy as np
from flwr.common import EvaluateRes, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fedmq.ftdl.reporter import ENV_FLOWER_ADDRESS, ENV_OUTPUT_DIR, MODEL_FILE, TaskReporter, task_args
from fedmq.ftdl.serverless.aggregate import weighted_average  # one averaging of metrics for both modes
from fedmq.ftdl.serverless.config import SERVERLESS, training_mode

__all__ = [
    "ReportingClient",
    "ReportingStrategy",
    "flower_address",
    "join",
    "ndarrays_to_parameters",
    "parameters_to_ndarrays",
    "serve",
    "weighted_average",
]


def flower_address(address: str | None = None) -> str:
    value = address or os.environ.get(ENV_FLOWER_ADDRESS)
    if not value:
        raise RuntimeError(f"no Flower address: pass one or set {ENV_FLOWER_ADDRESS} (ftdl does)")
    return value


def _scalars(metrics: dict[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if isinstance(value, (bool, int, float, str)):
            out[prefix + key] = value
    return out


class ReportingStrategy(Strategy):
    """Delegates to the author's strategy; reports every round and keeps the latest model."""

    def __init__(self, inner: Strategy, rounds: int, reporter: TaskReporter) -> None:
        self.inner, self.rounds, self.reporter = inner, rounds, reporter
        self.latest: Parameters | None = None
        self.last_metrics: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"ReportingStrategy({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, Any]]:
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        parameters, metrics = self.inner.aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self.latest = parameters
        stats = {"fit_clients": len(results), "fit_failures": len(failures),
                 "examples": sum(r.num_examples for _, r in results), **_scalars(metrics, "train_")}
        self.last_metrics.update(stats)
        self.reporter.send_stats(server_round, stats)
        self.reporter.send_progress(server_round, self.rounds)
        return parameters, metrics

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, Any]]:
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        loss, metrics = self.inner.aggregate_evaluate(server_round, results, failures)
        stats = {"eval_clients": len(results), **_scalars(metrics)}
        if loss is not None:
            stats["loss"] = float(loss)
        self.last_metrics.update(stats)
        self.reporter.send_stats(server_round, stats)
        return loss, metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        result = self.inner.evaluate(server_round, parameters)
        if result is not None and server_round > 0:
            loss, metrics = result
            stats = {"central_loss": float(loss), **_scalars(metrics, "central_")}
            self.last_metrics.update(stats)
            self.reporter.send_stats(server_round, stats)
        return result


def _save_model(parameters: Parameters | None, directory: str | None) -> str | None:
    if parameters is None or not directory:
        return None
    path = Path(directory) / MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = parameters_to_ndarrays(parameters)
    np.savez(path, *arrays)
    return str(path)


def serve(strategy: Strategy, *, rounds: int, address: str | None = None,
          round_timeout_s: float | None = None, reporter: TaskReporter | None = None) -> Any:
    """Run a Flower server for ``rounds`` rounds; report each round; save the final model."""
    reporter = reporter or TaskReporter.get()
    wrapped = ReportingStrategy(strategy, rounds, reporter)
    reporter.send_progress(0, rounds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        history = fl.server.start_server(
            server_address=flower_address(address), strategy=wrapped,
            config=fl.server.ServerConfig(num_rounds=rounds, round_timeout=round_timeout_s))
    model = _save_model(wrapped.latest, os.environ.get(ENV_OUTPUT_DIR))
    reporter.finish(rounds=rounds, metrics=wrapped.last_metrics, model=model)
    return history


class ReportingClient(fl.client.NumPyClient):
    """Delegates to the author's NumPyClient; reports local metrics after every fit/evaluate."""

    def __init__(self, inner: fl.client.NumPyClient, reporter: TaskReporter) -> None:
        self.inner, self.reporter = inner, reporter
        self.round = 0

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        return self.inner.get_properties(config)

    def get_parameters(self, config: dict[str, Scalar]) -> list[np.ndarray]:
        return self.inner.get_parameters(config)

    def fit(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> Any:
        self.round = int(config.get("server_round", self.round + 1))
        new_parameters, num_examples, metrics = self.inner.fit(parameters, config)
        self.reporter.send_stats(self.round, {"num_examples": num_examples, **_scalars(metrics, "train_")})
        return new_parameters, num_examples, metrics

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> Any:
        loss, num_examples, metrics = self.inner.evaluate(parameters, config)
        self.reporter.send_stats(self.round, {"loss": float(loss), "num_examples": num_examples,
                                              **_scalars(metrics)})
        return loss, num_examples, metrics


class ServerGone(ConnectionError):
    """The Flower server closed the stream mid-run (its host or the cloud went down): not this
    task failing on this device, so the agent stops the client without quarantining the task
    (the cloud marks the run failed, or offers it again once it runs).  The agent matches the
    exception's name, which the bootstrap reports."""


def _wait_for_server(address: str, timeout_s: float) -> None:
    """A device may be told of a task before its server listens (the server process is still
    importing); the legacy gRPC transport fails at once on a refused connection, so wait here."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2.0):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(f"the task's Flower server at {address} did not answer "
                                      f"within {timeout_s:g} s: {exc}") from None
            time.sleep(delay)
            delay = min(1.0, delay * 1.5)


def join(client: fl.client.NumPyClient, *, address: str | None = None, max_wait_s: float = 120.0,
         reporter: TaskReporter | None = None, aggregate: Any = None) -> None:
    """Connect a NumPyClient to the task's Flower server and train until the server is done -- or,
    when the task's arguments say ``mode = "serverless"``, train with the other participants and
    no server (``fedmq.ftdl.serverless``; ``aggregate`` names or is the aggregation function)."""
    reporter = reporter or TaskReporter.get()
    wrapped = ReportingClient(client, reporter)
    args = task_args()
    if training_mode(args) == SERVERLESS:
        from fedmq.ftdl.serverless.runner import run_from_env

        run_from_env(wrapped, args=args, reporter=reporter, aggregate=aggregate)
        return
    target = flower_address(address)
    _wait_for_server(target, max_wait_s)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            fl.client.start_client(server_address=target, client=wrapped.to_client(),
                                   insecure=True, max_wait_time=max_wait_s)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            raise ServerGone(f"the task's Flower server at {target} went away in round {wrapped.round}: "
                             f"{exc.details()}") from None
        raise
    reporter.finish(rounds=wrapped.round)
