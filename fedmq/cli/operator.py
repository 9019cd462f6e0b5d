"""``fedmq operator …``: people and tools with credentials -- operators, viewers (dashboards)
and service identities (cloud replicas)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from fedmq.cli.common import Output, OutputOpt, ago, err_console, globals_of, rpc, rpc_items, show
from fedmq.cli.identity import broker_for, warn_if_not_enforced, write_secret
from fedmq.ftdl.paths import absolute

app = typer.Typer(help="Operators, viewers and services: their credentials and roles.", no_args_is_help=True)
ROLES = ("operator", "viewer", "service")


def _issued(ctx: typer.Context, reply: dict[str, Any], output_file: Path | None) -> None:
    warn_if_not_enforced(reply)
    url = broker_for(reply, globals_of(ctx).broker_url)
    if output_file is not None:
        write_secret(absolute(output_file), url + "\n")
    else:
        sys.stdout.write(url + "\n")
    bound = f"with client id {reply['clientid']}" if reply.get("clientid") else "with any client id"
    err_console.print(f"{reply['name']} ({reply['role']}) may connect {bound}: use this URL as --broker or "
                      "FEDMQ_BROKER; the password is shown this once", highlight=False)


WriteOpt = typer.Option(None, "-o", "--output-file", show_default=False,
                        help="Write the broker URL with the credentials here (mode 600) instead of printing it.")


@app.command("add")
def add(ctx: typer.Context, name: str = typer.Argument(..., help="The new identity's name (its MQTT username)."),
        role: str = typer.Option("operator", "--role", help="operator, viewer (read-only, dashboards) or service."),
        output_file: Path | None = WriteOpt) -> None:
    """Create credentials; prints the broker URL that carries them."""
    if role not in ROLES:
        raise typer.BadParameter(f"choose one of {', '.join(ROLES)}", param_hint="--role")
    _issued(ctx, rpc(ctx, "identities", "add", {"name": name, "role": role}), output_file)


@app.command("rotate")
def rotate(ctx: typer.Context, name: str = typer.Argument(..., help="Identity name."),
           output_file: Path | None = WriteOpt) -> None:
    """A new password (the old one stops working; its connections are closed)."""
    _issued(ctx, rpc(ctx, "identities", "rotate", {"name": name}), output_file)


@app.command("revoke")
def revoke(ctx: typer.Context, name: str = typer.Argument(..., help="Identity name.")) -> None:
    """Delete the credentials: disconnected at once, and it cannot reconnect."""
    warn_if_not_enforced(rpc(ctx, "identities", "revoke", {"name": name}))
    err_console.print(f"revoked {name}")


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table("name", "role", "client id", "created", "rotated")
    for r in rows:
        table.add_row(r["name"], r["role"], r["clientid"] or "(any)", ago(r["created"]), ago(r["rotated"]))
    return table


@app.command("list")
def list_(ctx: typer.Context, output: OutputOpt = Output.TABLE) -> None:
    """Every identity the cloud knows, with its role (never a password)."""
    show(rpc_items(ctx, "identities", "list"), output, _table)
