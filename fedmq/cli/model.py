"""``fedmq model …``: register a finished run's model as NAME:VERSION, list, show and compare versions."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Group
from rich.table import Table

from fedmq.cli.common import Output, OutputOpt, ago, err_console, rpc, rpc_items, show

app = typer.Typer(help="The model registry: finished runs' models as NAME:VERSION.", no_args_is_help=True)


def _split(spec: str, what: str, number: str, optional: bool) -> tuple[str, int | None]:
    """``X:N`` (or ``X`` when ``optional``) -> (X, N): a usage error (exit 2) names what is wrong."""
    head, sep, tail = spec.rpartition(":")
    if not sep:
        if optional:
            return spec, None
        raise typer.BadParameter(f"{spec!r}: expected {what}:{number}")
    if not head or not tail.isdigit() or int(tail) < 1:
        raise typer.BadParameter(f"{spec!r}: expected {what}{'[' if optional else ''}:{number}"
                                 f"{']' if optional else ''} with {number} a number from 1")
    return head, int(tail)


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


_FIRST = ("accuracy", "loss")


def _metrics(metrics: dict[str, Any], limit: int = 3) -> str:
    """The telling metrics in a cell: accuracy and loss first, counts (rounds, clients, examples) left out."""
    keys = [k for k in metrics if k not in ("round", "examples", "eval_examples")
            and not k.endswith(("_clients", "_failures"))]
    keys.sort(key=lambda k: (_FIRST.index(k) if k in _FIRST else len(_FIRST), k))
    shown = " ".join(f"{k}={_value(metrics[k])}" for k in keys[:limit])
    return shown + (" …" if len(keys) > limit else "") or "-"


def _versions_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("model", "task:run", "metrics", "sha256", "size", "registered", "by", "note")
    for r in rows:
        table.add_row(f"{r['name']}:{r['version']}", f"{r['task']}:{r['run']}", _metrics(r.get("metrics") or {}),
                      r["sha256"][:12], str(r["size"]), ago(r.get("created")), r.get("created_by") or "",
                      r.get("note") or "")
    return table


def _show_table(r: dict[str, Any]) -> Group:
    lineage = r.get("lineage") or {}
    revision = lineage.get("revision") or {}
    about = Table("", "", show_header=False, title=f"{r['name']}:{r['version']}", title_justify="left")
    for key, value in (("from", f"{r['task']}:{r['run']}"), ("sha256", r["sha256"]), ("size", f"{r['size']} bytes"),
                       ("registered", f"{ago(r.get('created'))} by {r.get('created_by') or '-'}"),
                       ("note", r.get("note") or "-"), ("bundle", revision.get("bundle")),
                       ("revision", revision.get("revision")), ("mode", revision.get("mode")),
                       ("args", revision.get("args")), ("criteria", revision.get("criteria") or "-"),
                       ("requirements", revision.get("requirements")), ("rounds", lineage.get("rounds")),
                       ("cohort", ", ".join(lineage.get("cohort") or []) or "-")):
        about.add_row(key, _value(value))
    metrics = Table("metric", "value", title="final metrics", title_justify="left")
    for key, value in sorted((r.get("metrics") or {}).items()):
        metrics.add_row(key, _value(value))
    data = Table("device", "data digest", "examples", title="data fingerprints", title_justify="left")
    for device, print_ in sorted((lineage.get("data") or {}).items()):
        data.add_row(device, str(print_.get("digest", ""))[:16], _value(print_.get("examples")))
    return Group(about, metrics, data)


def _diff_table(result: dict[str, Any]) -> Group:
    a, b = result["a"], result["b"]
    left, right = f"{a['name']}:{a['version']}", f"{b['name']}:{b['version']}"
    same = "the same file" if result["same_model"] else "different files"
    lineage = Table("lineage", left, right, title=f"{left} vs {right}: {same}", title_justify="left")
    lineage.add_row("from", f"{a['task']}:{a['run']}", f"{b['task']}:{b['run']}")
    for key, (va, vb) in result["lineage"].items():
        if key not in ("task", "run"):
            lineage.add_row(key, _value(va), _value(vb))
    metrics = Table("metric", left, right, "change", title="final metrics", title_justify="left")
    for key, (va, vb) in result["metrics"].items():
        change = f"{vb - va:+.4g}" if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else \
            ("" if va == vb else "changed")
        metrics.add_row(key, _value(va), _value(vb), change)
    return Group(lineage, metrics)


@app.command("register")
def register(ctx: typer.Context,
             run: str = typer.Argument(..., metavar="TASK[:RUN]", help="The run (default: the task's latest)."),
             name: str | None = typer.Option(None, "--name", show_default=False,
                                             help="Model name (default: the task's model_name, else its name)."),
             note: str = typer.Option("", "--note", help="A note kept with the version."),
             output: OutputOpt = Output.TABLE) -> None:
    """Register a finished run's model as the next version of NAME (the same run again: its version)."""
    task, number = _split(run, "TASK", "RUN", optional=True)
    args = {k: v for k, v in dict(task=task, run=number, name=name, note=note or None).items() if v is not None}
    result = rpc(ctx, "models", "register", args)
    said = "registered" if result.pop("created") else "already registered as"
    err_console.print(f"{result['task']}:{result['run']} {said} {result['name']}:{result['version']}", highlight=False)
    show(result, output, lambda r: _versions_table([r]))


@app.command("list")
def list_(ctx: typer.Context,
          name: str | None = typer.Argument(None, show_default=False, help="Only the versions of this model."),
          output: OutputOpt = Output.TABLE) -> None:
    """Registered models, by name and version."""
    show(rpc_items(ctx, "models", "list", {"name": name} if name else {}), output, _versions_table)


@app.command("show")
def show_(ctx: typer.Context,
          model: str = typer.Argument(..., metavar="NAME[:VERSION]", help="The version (default: the latest)."),
          output: OutputOpt = Output.TABLE) -> None:
    """One version: where it came from (its lineage) and its final metrics."""
    name, version = _split(model, "NAME", "VERSION", optional=True)
    show(rpc(ctx, "models", "show", {"name": name, **({"version": version} if version else {})}), output, _show_table)


@app.command("diff")
def diff(ctx: typer.Context,
         a: str = typer.Argument(..., metavar="NAME:VERSION"),
         b: str = typer.Argument(..., metavar="NAME:VERSION"),
         output: OutputOpt = Output.TABLE) -> None:
    """What differs between two versions: lineage (revision, args, cohort, data) and metrics."""
    name_a, version_a = _split(a, "NAME", "VERSION", optional=False)
    name_b, version_b = _split(b, "NAME", "VERSION", optional=False)
    args = {"name": name_a, "a": version_a, "b": version_b, **({"other": name_b} if name_b != name_a else {})}
    show(rpc(ctx, "models", "diff", args), output, _diff_table)
