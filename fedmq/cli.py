"""The ``fedmq`` command.  Every subcommand that talks to services does so over MQTT RPC."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Optional

import typer
from rich.console import Console

from broker.codec import Codec
from broker.connection import BrokerUnavailable, MqttConnection, new_client_id
from broker.envelope import RpcError
from broker.rpc_client import RpcClient
from broker.topics import DEFAULT_PREFIX, Topics
from fedmq import __version__

app = typer.Typer(help="fedmq: federated-learning tasks on device fleets, over MQTT.",
                  no_args_is_help=True, add_completion=False)
console = Console()
err_console = Console(stderr=True)

BrokerOpt = typer.Option("mqtt://127.0.0.1:1883", "--broker", "-b", envvar="FEDMQ_BROKER",
                         help="Broker URL (mqtt://user:pass@host:port, mqtts:// for TLS).")
CallerOpt = typer.Option("operator", "--caller", envvar="FEDMQ_CALLER",
                         help="Who we are on the wire (with an ACL: the MQTT username).")
PrefixOpt = typer.Option(DEFAULT_PREFIX, "--prefix", envvar="FEDMQ_PREFIX", help="Topic prefix.")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug output.")) -> None:
    _setup_logging(verbose)


@app.command()
def version() -> None:
    """Print the fedmq version."""
    console.print(__version__)


@app.command()
def broker(host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
           port: int = typer.Option(1883, help="TCP port (0 picks a free one)."),
           user: list[str] = typer.Option([], "--user", help="USER:PASSWORD; repeat for more. "
                                          "Without any, anonymous clients are allowed.")) -> None:
    """Run the embedded MQTT broker (amqtt, MQTT 3.1.1) in the foreground."""
    from broker.embedded import EmbeddedBroker

    users: dict[str, str] = {}
    for entry in user:
        name, sep, password = entry.partition(":")
        if not sep or not name or not password:
            raise typer.BadParameter(f"expected USER:PASSWORD, got {entry!r}", param_hint="--user")
        users[name] = password
    embedded = EmbeddedBroker(host, port, users)
    try:
        embedded.start()
    except RuntimeError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"embedded broker listening on {embedded.url} "
                  f"({'password auth' if users else 'anonymous'}); Ctrl-C stops it")
    embedded.serve_forever()


def rpc_client(broker_url: str, caller: str, prefix: str) -> RpcClient:
    """Connect and return a ready client, or exit with a message a person can act on."""
    connection = MqttConnection(new_client_id(f"cli-{caller}"), broker_url)
    try:
        connection.start(timeout=5.0)
    except BrokerUnavailable as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    return RpcClient(connection, caller, Topics(prefix)).start()


def call_or_exit(client: RpcClient, service: str, method: str, args: dict[str, Any] | None = None,
                 timeout: float = 10.0) -> Any:
    try:
        return client.call(service, method, args or {}, timeout=timeout)
    except RpcError as exc:
        err_console.print(f"[red]{exc.code.value}:[/red] {exc.message}")
        raise typer.Exit(1) from None


@app.command()
def call(service: str = typer.Argument(..., help="Service name, e.g. tasks."),
         method: str = typer.Argument(..., help="Method name, e.g. ping."),
         args: str = typer.Option("{}", "--args", "-a", help="Arguments as a JSON object."),
         timeout: float = typer.Option(10.0, help="Seconds to wait for the reply."),
         broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Call any RPC method and print the result as JSON."""
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--args") from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--args")
    client = rpc_client(broker_url, caller, prefix)
    try:
        result = call_or_exit(client, service, method, parsed, timeout)
    finally:
        client.connection.stop()
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":  # pragma: no cover
    app()
