"""``fedmq device …``: the device registry."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from fedmq.cli.common import Output, OutputOpt, ago, rpc, rpc_items, show

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
