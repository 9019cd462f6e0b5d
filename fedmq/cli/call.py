"""``fedmq call``: any RPC method, by hand."""

from __future__ import annotations

import json
import sys

import typer

from fedmq.cli.common import json_arg, rpc


def register(app: typer.Typer) -> None:
    app.command()(call)


def call(ctx: typer.Context,
         service: str = typer.Argument(..., help="Service name, e.g. tasks."),
         method: str = typer.Argument(..., help="Method name, e.g. ping."),
         args: str = typer.Option("{}", "--args", "-a", help="Arguments as a JSON object."),
         timeout: float = typer.Option(10.0, help="Seconds to wait for the reply.")) -> None:
    """Call any RPC method and print the result as JSON."""
    parsed = json_arg(args, "--args")
    if not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--args")
    result = rpc(ctx, service, method, parsed, timeout)
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
