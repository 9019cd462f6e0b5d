"""The ``fedmq`` command: the root, its shared options, and one sub-app per noun.

Where things go: a new noun is a file of its own in this folder with a ``typer.Typer`` named
``app``, added below; a new verb of a noun is a function in that file.  Shared options
(``--broker``, ``--caller``, ``--prefix``) live here and reach every verb through the context.
"""

from __future__ import annotations

import logging

import click
import typer

from fedmq import __version__
from fedmq.broker.connection import BrokerSettings
from fedmq.broker.urls import with_absolute_files
from fedmq.cli import (
    apply,
    broker,
    bundle,
    call,
    cloud,
    dashboards,
    demo,
    deploy,
    device,
    edge,
    keys,
    model,
    operator,
    runs,
    task,
)
from fedmq.cli.common import Globals, console

EXIT_CODES = ("Exit codes: 0 done; 1 the service answered with an error (or a task or the demo ended "
              "badly); 2 usage; 3 broker unreachable or no answer from the service; 4 bad local input "
              "(a file that cannot be read or used); 130 interrupted.")

app = typer.Typer(help="fedmq: federated-learning tasks on device fleets, over MQTT.", epilog=EXIT_CODES,
                  no_args_is_help=True, add_completion=False)


def _version(value: bool) -> None:
    if value:
        console.print(f"fedmq {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(ctx: typer.Context,
         broker_url: str | None = typer.Option(
             None, "--broker", "-b", envvar="FEDMQ_BROKER", show_default=False,
             help="Broker URL: mqtt://user:pass@host:port, mqtts:// for TLS, ?protocol=5 for MQTT 5 "
                  "(default: mqtt://127.0.0.1:1883; for fedmq edge, its config file's)."),
         caller: str | None = typer.Option(None, "--caller", envvar="FEDMQ_CALLER", show_default=False,
                                           help="Who we are on the wire; the broker binds it to the MQTT "
                                                "username (default: the --broker URL's user, else operator)."),
         prefix: str | None = typer.Option(None, "--prefix", envvar="FEDMQ_PREFIX", show_default=False,
                                              help="Topic prefix (default: fedmq/v1)."),
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug output to stderr."),
         version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    source = ctx.get_parameter_source("broker_url")
    if caller is None:
        try:
            caller = (BrokerSettings.from_url(broker_url).username if broker_url else None) or "operator"
        except ValueError:  # the command that connects says what is wrong with the URL
            caller = "operator"
    broker_url = with_absolute_files(broker_url) if broker_url else broker_url
    ctx.obj = Globals(broker_url, caller, prefix, source is click.core.ParameterSource.COMMANDLINE)


for module in (broker, cloud, edge, demo, dashboards, call, apply):
    module.register(app)
for module, name in ((task, "task"), (device, "device"), (operator, "operator"), (bundle, "bundle"), (keys, "keys"),
                     (model, "model"), (runs, "run"), (deploy, "deploy")):
    app.add_typer(module.app, name=name)
