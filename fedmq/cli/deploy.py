"""``fedmq deploy …``: roll a registered model out to devices stage by stage, watch it, pause,
resume or roll it back.

``fedmq deploy NAME:VERSION --to ...`` is ``fedmq deploy start NAME:VERSION --to ...``: a first
argument that is not one of the verbs starts a deployment (the issue's form)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Group
from rich.table import Table
from typer.core import TyperGroup

from fedmq.cli.common import (
    ExitCode,
    Output,
    OutputOpt,
    Session,
    ago,
    console,
    err_console,
    fail,
    globals_of,
    rpc,
    rpc_items,
    show,
)
from fedmq.cli.model import _metrics, _split
from fedmq.ftdl.paths import absolute

ENDED = ("completed", "rolled_back")


class _StartByDefault(TyperGroup):
    """``deploy NAME:VERSION ...`` runs ``deploy start NAME:VERSION ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["start", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_StartByDefault, no_args_is_help=True,
                  help="Deployments: a registered model (NAME:VERSION) to devices, stage by stage, judged by their "
                       "health reports and rolled back when too many fail.  'fedmq deploy NAME:VERSION ...' = "
                       "'fedmq deploy start NAME:VERSION ...'.")


def _stages(text: str) -> list[float]:
    """``5%,25%,100%`` or ``0.05,0.25,1`` -> fractions."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            values.append(float(part[:-1]) / 100 if part.endswith("%") else float(part))
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not a percentage or a fraction", param_hint="--stages") from None
    return values


def _summary(d: dict[str, Any]) -> str:
    counts = d.get("devices") or {}
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "-"


def _list_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("id", "model", "state", "stage", "devices", "health", "created", "by")
    for d in rows:
        table.add_row(d["id"], d["model"], d["state"], f"{d['stage']}/{d['stage_count']}", _summary(d),
                      d.get("health") or "-", ago(d.get("created")), d.get("created_by") or "")
    return table


_STATE_STYLE = {"healthy": "green", "unhealthy": "red", "rolled_back": "yellow", "sent": "cyan", "pending": "dim",
                "completed": "green", "running": "cyan", "paused": "yellow"}


def _styled(state: str) -> str:
    style = _STATE_STYLE.get(state)
    return f"[{style}]{state}[/{style}]" if style else state


def _status(d: dict[str, Any]) -> Group:
    stages = ", ".join(f"{f * 100:g}%" for f in d["stages"])
    about = Table("", "", show_header=False, title=f"deployment {d['id']}: {d['model']}", title_justify="left")
    for key, value in (("state", _styled(d["state"])), ("stage", f"{d['stage']} of {d['stage_count']} ({stages})"),
                       ("why", d.get("reason") or "-"), ("to", d.get("criteria") or "(every device)"),
                       ("health", d.get("health") or "(loading is enough)"),
                       ("max failure rate", f"{d['max_failure_rate']:g} per stage, timeout {d['stage_timeout_s']:g} s"),
                       ("signed", f"by key {d['key_id']}" if d.get("signed") else "no"),
                       ("created", f"{ago(d.get('created'))} by {d.get('created_by') or '-'}")):
        about.add_row(key, value)
    devices = Table("device", "stage", "state", "metrics", "reason", title="devices", title_justify="left")
    for row in d.get("devices_detail") or []:
        devices.add_row(row["device"], str(row["stage"]), _styled(row["state"]), _metrics(row.get("metrics") or {}),
                        row.get("reason") or "")
    decisions = Table("when", "decision", "device", "reason", title="decisions", title_justify="left")
    for step in d.get("timeline") or []:
        decisions.add_row(time.strftime("%H:%M:%S", time.localtime(step["ts"])),
                          step["kind"].removeprefix("deployment_").replace("_", " "), step.get("device") or "",
                          step.get("reason") or "")
    return Group(about, devices, decisions)


@app.command("start")
def start(ctx: typer.Context,
          model: str = typer.Argument(..., metavar="NAME:VERSION", help="The registered version to deploy."),
          to: str = typer.Option("", "--to", help="Criteria selecting the devices (default: every device)."),
          stages: str = typer.Option("100%", "--stages", help="Cumulative shares of those devices, e.g. 5%,25%,100%."),
          max_failure_rate: float = typer.Option(0.0, "--max-failure-rate", min=0.0, max=1.0,
                                                 help="The share of a stage's devices that may fail (0..1)."),
          health: str = typer.Option("", "--health", help="Expression over what a device reports, e.g. "
                                                          "'accuracy >= 0.85' (default: loading is enough)."),
          stage_timeout: float = typer.Option(600.0, "--stage-timeout", min=1.0,
                                              help="Seconds a stage waits for reports; silence counts as failure."),
          key: Path | None = typer.Option(None, "--key", envvar="FEDMQ_SIGNING_KEY", show_default=False,
                                          help="Private key to sign the model's identity with (fedmq keys new)."),
          deployment: str | None = typer.Option(None, "--id", show_default=False, help="The deployment's id."),
          watch: bool = typer.Option(False, "--watch", help="Then follow it until it completes or rolls back."),
          output: OutputOpt = Output.TABLE) -> None:
    """Deploy NAME:VERSION to the devices --to selects, stage by stage."""
    from fedmq.ftdl.signing import SigningError, SigningKey, model_signing_message

    name, version = _split(model, "NAME", "VERSION", optional=False)
    fractions = _stages(stages)
    try:
        signing_key = SigningKey.load(absolute(key)) if key else None
    except SigningError as exc:
        fail(ExitCode.BAD_INPUT, str(exc))
    with Session(globals_of(ctx), "deployments") as session:
        args: dict[str, Any] = {"name": name, "version": version, "to": to, "stages": fractions,
                                "max_failure_rate": max_failure_rate, "health": health,
                                "stage_timeout_s": stage_timeout}
        if deployment:
            args["deployment"] = deployment
        if signing_key is not None:
            sha256 = session.call("models", "show", {"name": name, "version": version})["sha256"]
            args.update(signature=signing_key.sign(model_signing_message(name, int(version or 0), sha256)),
                        key_id=signing_key.key_id)
        else:
            err_console.print("[yellow]warning:[/yellow] unsigned: devices install only models signed by a key they "
                              "trust; sign with --key (fedmq keys new) unless they allow unsigned models")
        created = session.call("deployments", "create", args)
        err_console.print(f"deployment {created['id']}: {created['model']} to "
                          f"{sum((created.get('devices') or {}).values())} device(s)", highlight=False)
        if watch and output is Output.TABLE:
            _watch(session, created["id"], 1.0)
            return
    show(created, output, _status)


def _latest(ctx: typer.Context) -> str:
    rows = rpc_items(ctx, "deployments", "list")
    if not rows:
        fail(ExitCode.REMOTE_ERROR, "there are no deployments yet", "not_found")
    active = [d for d in rows if d["state"] not in ENDED]
    return str((active or rows)[0]["id"])


def _watch(session: Session, deployment: str, interval: float) -> None:
    """The live table until the deployment ends: exit 0 when it completed, 1 when it rolled back."""
    from rich.live import Live

    current = session.call("deployments", "get", {"deployment": deployment})
    try:
        with Live(_status(current), console=console, refresh_per_second=4, transient=False) as live:
            while current["state"] not in ENDED:
                time.sleep(interval)
                current = session.call("deployments", "get", {"deployment": deployment})
                live.update(_status(current))
    except KeyboardInterrupt:
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    if current["state"] == "rolled_back":
        raise typer.Exit(int(ExitCode.REMOTE_ERROR))


@app.command("status")
def status(ctx: typer.Context,
           deployment: str | None = typer.Argument(None, metavar="[ID]", show_default=False,
                                                   help="The deployment (default: the latest running one, else "
                                                        "the latest)."),
           watch: bool = typer.Option(False, "--watch", "-w", help="Follow it live until it completes (exit 0) or "
                                                                   "rolls back (exit 1)."),
           interval: float = typer.Option(1.0, "--interval", min=0.2, help="Seconds between refreshes (--watch)."),
           output: OutputOpt = Output.TABLE) -> None:
    """One deployment: its stage, each device's state and metrics, and the decisions with their reasons."""
    deployment = deployment or _latest(ctx)
    if watch and output is Output.TABLE:
        with Session(globals_of(ctx), "deployments") as session:
            _watch(session, deployment, interval)
        return
    show(rpc(ctx, "deployments", "get", {"deployment": deployment}), output, _status)


@app.command("list")
def list_(ctx: typer.Context,
          state: str | None = typer.Option(None, "--state", show_default=False,
                                           help="running, paused, completed or rolled_back."),
          name: str | None = typer.Option(None, "--model", show_default=False, help="Only this model's."),
          output: OutputOpt = Output.TABLE) -> None:
    """Deployments, newest first."""
    args = {k: v for k, v in dict(state=state, name=name).items() if v is not None}
    show(rpc_items(ctx, "deployments", "list", args), output, _list_table)


def _verb(ctx: typer.Context, method: str, deployment: str, output: Output, **args: Any) -> None:
    result = rpc(ctx, "deployments", method, {"deployment": deployment, **args})
    err_console.print(f"deployment {result['id']} is {result['state']}: {result.get('reason') or ''}", highlight=False)
    show(result, output, lambda r: _list_table([r]))


@app.command("pause")
def pause(ctx: typer.Context, deployment: str = typer.Argument(..., metavar="ID"),
          output: OutputOpt = Output.TABLE) -> None:
    """Stop advancing stages (reports are still recorded)."""
    _verb(ctx, "pause", deployment, output)


@app.command("resume")
def resume(ctx: typer.Context, deployment: str = typer.Argument(..., metavar="ID"),
           output: OutputOpt = Output.TABLE) -> None:
    """Advance again (the stage's timeout counts from now)."""
    _verb(ctx, "resume", deployment, output)


@app.command("rollback")
def rollback(ctx: typer.Context, deployment: str = typer.Argument(..., metavar="ID"),
             reason: str = typer.Option("", "--reason", help="Why, for the timeline."),
             output: OutputOpt = Output.TABLE) -> None:
    """Give every device that took the version the one it had before."""
    _verb(ctx, "rollback", deployment, output, reason=reason)
