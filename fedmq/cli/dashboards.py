"""``fedmq dashboards``: Node-RED with the fedmq flows."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmq.cli.common import ExitCode, console, fail, globals_of
from fedmq.ftdl.paths import absolute


def register(app: typer.Typer) -> None:
    app.command()(dashboards)


def dashboards(ctx: typer.Context,
               port: int = typer.Option(1880, help="HTTP port of Node-RED (dashboard at /dashboard)."),
               user_dir: Path = typer.Option(Path("fedmq-dashboards"), "--user-dir",
                                             help="Node-RED's folder (the flows are copied there at each start; "
                                                  "Node-RED is installed there with npm if need be).")) -> None:
    """Run Node-RED with the fedmq dashboards against the broker.

    They speak as --caller (default: the --broker URL's user): a viewer identity watches, an
    operator also steers."""
    from fedmq.node_red import DashboardError, run_node_red

    try:
        g = globals_of(ctx)
        run_node_red(g.broker_url, port, absolute(user_dir), g.caller, console)
    except DashboardError as exc:
        fail(ExitCode.BAD_INPUT, str(exc))
