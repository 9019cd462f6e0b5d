"""``fedmq edge``: the agent of one device, in the foreground.

The console script runs plain ``fedmq edge`` command lines through ``fedmq.cli.edge_run`` without
loading typer; this command is their help, their usage errors, and the same options (keep the two
in step: tests/test_edge_light.py checks).
"""

from __future__ import annotations

from pathlib import Path

import typer

from fedmq.cli.common import ExitCode, console, fail, globals_of


def register(app: typer.Typer) -> None:
    app.command()(edge)


def edge(ctx: typer.Context,
         device_id: str | None = typer.Option(None, "--device-id", envvar="FEDMQ_DEVICE_ID", show_default=False,
                                                 help="This device's id (also its MQTT username with an ACL)."),
         config: Path | None = typer.Option(None, "--config", envvar="FEDMQ_EDGE_CONFIG", show_default=False,
                                               help="TOML config file (relative paths in it: from its folder)."),
         alternate: list[str] = typer.Option([], "--alternate", help="Another broker URL to fail over to; repeatable."),
         work_dir: Path | None = typer.Option(None, "--work-dir", envvar="FEDMQ_WORK_DIR", show_default=False,
                                                 help="Bundle cache, run logs, state (default: ./fedmq-edge)."),
         data_dir: Path | None = typer.Option(None, "--data-dir", envvar="FEDMQ_DATA_DIR", show_default=False,
                                                 help="The device's data, handed to tasks."),
         trust: list[Path] = typer.Option([], "--trust",
                                          help="Trusted bundle signing key (.pub or folder); repeatable."),
         allow_unsigned: bool | None = typer.Option(None, "--allow-unsigned", show_default=False,
                                                       help="Run unsigned bundles (development only)."),
         policy: str | None = typer.Option(None, "--policy", show_default=False,
                                              help="Task policy (default: at_most_one)."),
         recheck_interval: float | None = typer.Option(None, "--recheck-interval", show_default=False,
                                                          help="Safety-net re-check, seconds (default: 60)."),
         report_interval: float | None = typer.Option(None, "--report-interval", show_default=False,
                                                         help="Report device info at least this often, "
                                                              "seconds (default: 300)."),
         label: list[str] = typer.Option([], "--label", help="KEY=VALUE reported for selection; repeatable.")) -> None:
    """Run the edge agent of this device in the foreground."""
    from fedmq.cli.edge_run import BadInput, serve

    g = globals_of(ctx)
    labels = {}
    for item in label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--label")
        labels[key] = value
    try:
        serve(broker=g.broker, broker_on_command_line=g.broker_on_command_line, prefix=g.prefix, device_id=device_id,
              config=config, alternate=alternate, work_dir=work_dir, data_dir=data_dir, trust=trust,
              allow_unsigned=allow_unsigned, policy=policy, recheck_interval=recheck_interval,
              report_interval=report_interval, labels=labels,
              say=lambda line: console.print(line, highlight=False))
    except BadInput as exc:
        fail(ExitCode.BAD_INPUT, str(exc))
