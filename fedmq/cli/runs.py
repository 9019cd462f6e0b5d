"""``fedmq run …``: one run's record, and runs compared -- what they were made from (revision,
arguments, criteria, requirements, cohort, each device's data fingerprint) and how they ended.

A run is named ``TASK:RUN`` (``TASK`` alone: its latest run).  The file is ``runs.py``, not
``run.py``: ``fedmq.cli.run`` is the ``fedmq`` entry point, which a submodule would shadow."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.cli.common import ExitCode, Output, OutputOpt, Session, ago, console, err_console, fail, globals_of
from fedmq.cloud.lineage import Row, compare
from fedmq.ftdl.paths import absolute

app = typer.Typer(help="Show one run's record, or compare runs (TASK:RUN; TASK alone is its latest run).",
                  no_args_is_help=True)
SpecArg = typer.Argument(..., metavar="TASK[:RUN]", help="A task's run, e.g. digits-1:2 (TASK alone: its latest).")


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``TASK:RUN`` -> (task, run); ``TASK`` -> (task, None).  A bad one is a usage error (exit 2)."""
    task, colon, run = spec.rpartition(":") if ":" in spec else (spec, "", "")
    if not task:
        raise typer.BadParameter(f"{spec!r}: give TASK or TASK:RUN, e.g. digits-1:2")
    if colon and not (run.isdigit() and int(run) >= 1):
        raise typer.BadParameter(f"{spec!r}: RUN must be a run number (1, 2, ...), e.g. {task}:1")
    return task, int(run) if colon else None


def _label(record: dict[str, Any]) -> str:
    return f"{record['task']}:{record['run']}"


def _text(value: Any) -> str:
    """A field's value in a cell: short digests, counts of examples, lists joined."""
    if value is None:
        return "-"
    if isinstance(value, dict) and "digest" in value:
        return f"{str(value['digest'])[:12]} ×{value.get('examples')}"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return f"{len(value)}: {', '.join(map(str, value))}" if value else "0"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _records(session: Session, parsed: list[tuple[str, int | None]]) -> list[dict[str, Any]]:
    return [session.call("tasks", "run", {"task": task, **({"run": run} if run else {})}) for task, run in parsed]


def _rounds(session: Session, record: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        return session.client.all_items("tasks", "metrics", {"task": record["task"], "run": record["run"]})
    except RpcError as exc:
        session.close()
        fail(ExitCode.UNREACHABLE if exc.code is ErrorCode.TIMEOUT else ExitCode.REMOTE_ERROR, exc.message,
             exc.code.value)


def _json(result: Any) -> None:
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")


@app.command("show")
def show(ctx: typer.Context, spec: str = SpecArg, output: OutputOpt = Output.TABLE) -> None:
    """One run's record: what it started with, its cohort and their data, how it ended, its model."""
    parsed = parse_spec(spec)  # before connecting: a bad spec needs no broker to be told
    with Session(globals_of(ctx), "tasks") as session:
        (record,) = _records(session, [parsed])
    if output is Output.JSON:
        _json(record)
        return
    duration = f"{record['finished'] - record['started']:.1f}s" if record.get("finished") else "running"
    table = Table("field", "value", title=f"{_label(record)} — {record['state']}, started {ago(record['started'])}, "
                                          f"{duration}", title_justify="left")
    for row in compare([record]):
        table.add_row(row.field, _text(row.values[0]))
    console.print(table)


def _table(records: list[dict[str, Any]], rows: list[Row], title: str) -> Table:
    table = Table("", "field", *map(_label, records), title=title, title_justify="left")
    for row in rows:
        style = "bold yellow" if row.differs else None
        table.add_row("≠" if row.differs else "", row.field, *map(_text, row.values), style=style)
    return table


@app.command("compare")
def compare_runs(ctx: typer.Context,
                 specs: list[str] = typer.Argument(..., metavar="TASK[:RUN]...",
                                                   help="Two or more runs, e.g. digits-1:1 digits-1:2."),
                 plot: Path | None = typer.Option(None, "--plot", show_default=False,
                                                  help="Overlay the runs' per-round curves in this PNG."),
                 every: bool = typer.Option(False, "--all", help="Show lineage fields that are the same too."),
                 output: OutputOpt = Output.TABLE) -> None:
    """What differs between runs (revision, each argument, criteria, requirements, cohort, each
    device's data fingerprint) and their final metrics side by side."""
    if len(specs) < 2:
        raise typer.BadParameter("give two runs or more to compare", param_hint="TASK[:RUN]...")
    parsed = [parse_spec(s) for s in specs]  # every spec checked before connecting
    with Session(globals_of(ctx), "tasks") as session:
        records = _records(session, parsed)
        curves = [(_label(r), _rounds(session, r)) for r in records] if plot or output is Output.JSON else []
    rows = compare(records)
    lineage = [r for r in rows if r.lineage]
    differing = [r.field for r in rows if r.differs]
    if output is Output.JSON:
        _json({"runs": records, "differs": differing,
               "fields": {r.field: r.values for r in rows}, "rounds": dict(curves)})
    else:
        shown = lineage if every else [r for r in lineage if r.differs]
        same = len(lineage) - sum(r.differs for r in lineage)
        console.print(_table(records, shown, f"lineage: {len(lineage) - same} field(s) differ, {same} the same"
                                             + ("" if every else " (--all shows them)")))
        console.print(_table(records, [r for r in rows if not r.lineage], "outcome"))
    if plot:
        from fedmq.plots import plot_comparison

        plot = absolute(plot)
        try:
            plot_comparison(curves, plot, " vs ".join(map(_label, records)))
        except RuntimeError as exc:  # matplotlib missing
            fail(ExitCode.BAD_INPUT, str(exc))
        except OSError as exc:
            fail(ExitCode.BAD_INPUT, f"cannot write {plot}: {exc}")
        err_console.print(f"wrote {plot}", highlight=False)
