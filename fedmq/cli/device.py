"""``fedmq device …``: the device registry, and devices' credentials."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from fedmq.cli.common import Output, OutputOpt, ago, err_console, globals_of, rpc, rpc_items, show
from fedmq.cli.identity import broker_for, warn_if_not_enforced, write_secret
from fedmq.ftdl.paths import absolute

app = typer.Typer(help="The device registry.", no_args_is_help=True)


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table("device", "online", "last seen", "disconnects", "data", "cpus", "memory MB", "task", "accuracy")
    for r in rows:
        info = r["info"] or {}
        table.add_row(r["id"], "[green]yes[/]" if r["online"] else "[red]no[/]", ago(r["last_seen"]),
                      str(r["disconnections"]), str(info.get("data_quantity", "-")), str(info.get("cpu_count", "-")),
                      str(round(info["memory_mb"])) if info.get("memory_mb") else "-",
                      info.get("current_task") or "-",
                      f"{info['accuracy']:.3f}" if isinstance(info.get("accuracy"), (int, float)) else "-")
    return table


@app.command("list")
def list_(ctx: typer.Context,
          online: bool | None = typer.Option(None, "--online/--offline", show_default=False,
                                                help="Only online (or offline) devices; all by default."),
          output: OutputOpt = Output.TABLE) -> None:
    """List devices."""
    show(rpc_items(ctx, "devices", "list", {} if online is None else {"online": online}), output, _table)


@app.command("get")
def get(ctx: typer.Context, device: str = typer.Argument(..., help="Device id."),
        output: OutputOpt = Output.JSON) -> None:
    """Show one device (JSON by default)."""
    show(rpc(ctx, "devices", "get_info", {"device": device}), output, lambda row: _table([row]))


def _edge_config(reply: dict[str, Any], broker: str, trust: list[str]) -> str:
    lines = [f"# fedmq edge config for {reply['name']}: fedmq edge --config THIS_FILE",
             f"device_id = {json.dumps(reply['name'])}",
             f"broker = {json.dumps(broker_for(reply, broker))}",
             'work_dir = "/var/lib/fedmq-edge"',
             f"trusted_keys = {json.dumps(trust)}"]
    return "\n".join(lines) + "\n"


def _provisioned(ctx: typer.Context, reply: dict[str, Any], device_broker: str | None, trust: list[Path],
                 output_file: Path | None) -> None:
    warn_if_not_enforced(reply)
    text = _edge_config(reply, device_broker or globals_of(ctx).broker_url, [str(absolute(p)) for p in trust]
                        or ["/etc/fedmq/operator.pub"])
    if output_file is not None:
        write_secret(absolute(output_file), text)
    else:
        sys.stdout.write(text)
    err_console.print(f"{reply['name']} may connect with client id {reply['clientid']}; the password is shown "
                      "this once (rotate it to get another)", highlight=False)


DeviceBrokerOpt = typer.Option(None, "--device-broker", show_default=False,
                               help="The broker URL as devices reach it, without credentials "
                                    "(default: this command's --broker).")
TrustOpt = typer.Option([], "--trust", help="Public key (.pub) the device trusts; repeatable.")
WriteOpt = typer.Option(None, "-o", "--output-file", show_default=False,
                        help="Write the device's config here (mode 600) instead of printing it.")


@app.command("add")
def add(ctx: typer.Context, device: str = typer.Argument(..., help="The new device's id."),
        device_broker: str | None = DeviceBrokerOpt, trust: list[Path] = TrustOpt,
        output_file: Path | None = WriteOpt) -> None:
    """Create a device's credentials on the broker and print its edge config (password included)."""
    _provisioned(ctx, rpc(ctx, "identities", "add", {"name": device, "role": "device"}), device_broker, trust,
                 output_file)


@app.command("rotate")
def rotate(ctx: typer.Context, device: str = typer.Argument(..., help="Device id."),
           device_broker: str | None = DeviceBrokerOpt, trust: list[Path] = TrustOpt,
           output_file: Path | None = WriteOpt) -> None:
    """A new password for a device (the old one stops working; its connection is closed)."""
    _provisioned(ctx, rpc(ctx, "identities", "rotate", {"name": device}), device_broker, trust, output_file)


@app.command("revoke")
def revoke(ctx: typer.Context, device: str = typer.Argument(..., help="Device id.")) -> None:
    """Delete a device's credentials: it is disconnected at once and cannot reconnect."""
    reply = rpc(ctx, "identities", "revoke", {"name": device})
    warn_if_not_enforced(reply)
    err_console.print(f"revoked {device}")
