"""``fedmq demo``: the whole system on one machine, AGATA's experiments end to end."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from fedmq.cli.common import ExitCode, console, fail, globals_of
from fedmq.ftdl.paths import absolute


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(ctx: typer.Context,
         scenario: str = typer.Option("basic", help="basic (AGATA's experiment 1), failover (experiment 2) or "
                                      "serverless (no Flower server; the aggregator of round 2 is killed)."),
         workdir: Path = typer.Option(Path("fedmq-demo"), help="Where logs, events.json and result.json go "
                                      "(emptied first)."),
         rounds: int = typer.Option(5, help="Federated rounds of the digits task.")) -> None:
    """Run the end-to-end demo: broker, cloud and two edges as processes; train digits.

    On the embedded broker, unless one is given on the command line (fedmq --broker URL demo;
    FEDMQ_BROKER is not used, so a shell of the quick tour still gets its own)."""
    from fedmq.demo import DemoError
    from fedmq.demo import main as demo_main

    g = globals_of(ctx)
    logging.getLogger("fedmq").setLevel(logging.ERROR)
    try:
        summary = demo_main(g.broker if g.broker_on_command_line else None, scenario, absolute(workdir), rounds,
                            console)
    except DemoError as exc:
        fail(ExitCode.REMOTE_ERROR, str(exc), "demo failed")
    except KeyboardInterrupt:
        fail(ExitCode.INTERRUPTED, "every process the demo started has been stopped", "interrupted")
    if summary["task"]["state"] != "finished":
        raise typer.Exit(int(ExitCode.REMOTE_ERROR))
