"""``fedmq task …``: create, start, stop, follow and inspect tasks and their runs."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from fedmq.broker.schema import SelectionMode as Selection
from fedmq.cli.common import (
    ExitCode,
    Output,
    OutputOpt,
    Session,
    ago,
    connect,
    err_console,
    fail,
    globals_of,
    json_arg,
    progress,
    rpc,
    rpc_items,
    show,
)
from fedmq.ftdl.paths import absolute

app = typer.Typer(help="Create, start, stop and inspect tasks.", no_args_is_help=True)
RunOpt = typer.Option(None, "--run", help="Run number (default: the latest).", show_default=False)
_COLOURS = {"running": "green", "failed": "red", "finished": "blue", "stopped": "yellow"}
RegisterIfOpt = typer.Option(None, "--register-if", show_default=False,
                             help="Register each finished run whose final metrics satisfy this, e.g. "
                                  "'accuracy >= 0.9' (fedmq model; '' for none).")
ModelNameOpt = typer.Option(None, "--model-name", show_default=False,
                            help="The model --register-if registers runs as (default: the task's name).")


def task_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("id", "name", "state", "rev", "round", "priority", "flower", "tags", "bundle", "register if")
    for r in rows:
        rounds = f"{r['round']}/{r['total_rounds']}" if r.get("total_rounds") else str(r.get("round") or 0)
        state = f"[{_COLOURS.get(r['state'], 'white')}]{r['state']}[/]"
        policy = f"{r['register_if']} -> {r.get('model_name') or r['name']}" if r.get("register_if") else "-"
        table.add_row(r["id"], r["name"], state, str(r["revision"]), rounds, str(r["priority"]),
                      r["flower"] or "-", ",".join(r["tags"] or []), r["bundle"][:12], policy)
    return table


def _one(row: dict[str, Any]) -> Table:
    return task_table([row])


SELECTION_HELP = ("Where the criteria are evaluated: cloud (on reported facts) or device (privacy mode: each "
                  "device decides on its own facts and joins).")

@app.command("create")
def create(ctx: typer.Context,
           name: str = typer.Argument(..., help="Task name."),
           bundle: str | None = typer.Option(None, show_default=False, help="Bundle digest (from fedmq bundle push)."),
           folder: str | None = typer.Option(None, show_default=False,
                                                help="A task folder on the cloud host instead of --bundle."),
           task_id: str | None = typer.Option(None, "--id", show_default=False,
                                                 help="Task id (default: NAME-<random>)."),
           criteria: str = typer.Option("", help="Selection criteria, e.g. 'data_quantity > 100'."),
           args: str | None = typer.Option(None, show_default=False, help="Task arguments as a JSON object."),
           requirements: str | None = typer.Option(None, show_default=False,
                                                      help="Requirements as JSON (default: the bundle's)."),
           tag: list[str] = typer.Option([], "--tag", help="Tag; repeatable."),
           priority: int = typer.Option(0, help="Higher runs first."),
           flower_port: int | None = typer.Option(None, show_default=False,
                                                     help="Flower port (default: a free one at start)."),
           flower_host: str | None = typer.Option(None, show_default=False,
                                                     help="Host devices use to reach the Flower server."),
           register_if: str | None = RegisterIfOpt, model_name: str | None = ModelNameOpt,
           selection: Selection = typer.Option(Selection.CLOUD, help=SELECTION_HELP),
           output: OutputOpt = Output.TABLE) -> None:
    """Create a task."""
    if folder is not None:  # a path on the cloud host; relative to here if this is the cloud host
        folder = str(absolute(folder))
    payload = {k: v for k, v in dict(name=name, bundle=bundle, folder=folder, task=task_id, criteria=criteria,
                                     args=json_arg(args, "--args"),
                                     requirements=json_arg(requirements, "--requirements"),
                                     tags=tag or None, priority=priority, flower_port=flower_port,
                                     flower_host=flower_host, register_if=register_if,
                                     model_name=model_name, selection=selection.value).items() if v is not None}
    show(rpc(ctx, "tasks", "create", payload), output, _one)


@app.command("list")
def list_(ctx: typer.Context,
          state: str | None = typer.Option(None, show_default=False, help="Only tasks in this state."),
          tag: str | None = typer.Option(None, show_default=False, help="Only tasks with this tag."),
          output: OutputOpt = Output.TABLE) -> None:
    """List tasks."""
    args = {k: v for k, v in dict(state=state, tag=tag).items() if v is not None}
    show(rpc_items(ctx, "tasks", "list", args), output, task_table)


@app.command("get")
def get(ctx: typer.Context, task: str = typer.Argument(..., help="Task id."),
        output: OutputOpt = Output.JSON) -> None:
    """Show one task (JSON by default)."""
    show(rpc(ctx, "tasks", "get", {"task": task}), output, _one)


@app.command("update")
def update(ctx: typer.Context, task: str = typer.Argument(..., help="Task id."),
           criteria: str | None = typer.Option(None, show_default=False, help="New selection criteria."),
           args: str | None = typer.Option(None, show_default=False, help="New arguments as a JSON object."),
           priority: int | None = typer.Option(None, show_default=False, help="New priority."),
           bundle: str | None = typer.Option(None, show_default=False, help="New bundle digest (task stopped)."),
           tag: list[str] = typer.Option([], "--tag", help="Tags replacing the current ones; repeatable."),
           register_if: str | None = RegisterIfOpt, model_name: str | None = ModelNameOpt,
           selection: Selection | None = typer.Option(None, show_default=False, help=SELECTION_HELP),
           output: OutputOpt = Output.TABLE) -> None:
    """Change criteria, arguments, priority, tags, bundle, selection or the model policy (a new revision)."""
    payload = {k: v for k, v in dict(task=task, criteria=criteria, args=json_arg(args, "--args"),
                                     priority=priority, bundle=bundle, tags=tag or None, register_if=register_if,
                                     model_name=model_name,
                                     selection=selection.value if selection else None).items() if v is not None}
    show(rpc(ctx, "tasks", "update", payload), output, _one)


@app.command("start")
def start(ctx: typer.Context, task: str = typer.Argument(..., help="Task id."),
          output: OutputOpt = Output.TABLE) -> None:
    """Start a task (its Flower server runs on the cloud host)."""
    show(rpc(ctx, "tasks", "start", {"task": task}), output, _one)


@app.command("stop")
def stop(ctx: typer.Context, task: str = typer.Argument(..., help="Task id."),
         output: OutputOpt = Output.TABLE) -> None:
    """Stop a running task; its devices are told to stop."""
    show(rpc(ctx, "tasks", "stop", {"task": task}), output, _one)


@app.command("delete")
def delete(ctx: typer.Context, task: str = typer.Argument(..., help="Task id.")) -> None:
    """Delete a task (stopping it first)."""
    rpc(ctx, "tasks", "delete", {"task": task})
    err_console.print(f"deleted {task}")


@app.command("wait")
def wait(ctx: typer.Context, task: str = typer.Argument(..., help="Task id."),
         timeout: float = typer.Option(3600.0, help="Give up after this many seconds.")) -> None:
    """Wait for a task's run to end, with a progress bar of its rounds.

    Exits 0 when it finished, 1 when it failed or was stopped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedmq.cloud.task_client import TaskWaitTimeout, wait_for_task

    g = globals_of(ctx)
    rpc(ctx, "tasks", "get", {"task": task})  # a task that does not exist is said at once
    connection = connect(g)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
                      TimeElapsedColumn(), console=err_console, disable=not err_console.is_terminal) as bar:
            line = bar.add_task(task, total=None)

            def on_update(body: dict[str, Any]) -> None:
                bar.update(line, completed=body.get("round") or 0, total=body.get("total_rounds"),
                           description=f"{task} ({body.get('state')}, run {body.get('run')})")

            final = wait_for_task(connection, g.topics, task, timeout, on_update=on_update)
    except LookupError as exc:
        fail(ExitCode.REMOTE_ERROR, str(exc), "not_found")
    except TaskWaitTimeout as exc:
        fail(ExitCode.REMOTE_ERROR, str(exc), "timeout")
    finally:
        connection.stop()
    rounds = f"{final.get('round', 0)}/{final.get('total_rounds') or '?'} rounds"
    if final["state"] == "finished":
        err_console.print(f"{task} finished run {final.get('run')} ({rounds})", highlight=False)
        return
    reason = f": {final['last_error']}" if final.get("last_error") else ""
    fail(ExitCode.REMOTE_ERROR, f"in run {final.get('run')} after {rounds}{reason}", f"{task} {final['state']}")


def _timeline_table(result: dict[str, Any]) -> Table:
    table = Table("step", "component", "device", "t (s)", "Δ (s)")
    for row in result["timeline"]:
        table.add_row(row["step"], row["component"], row["device"] or "", f"{row['t_s']:.3f}", f"{row['delta_s']:.3f}")
    return table


@app.command("events")
def events(ctx: typer.Context, task: str = typer.Argument(..., help="Task id."),
           json_file: Path | None = typer.Option(None, "--json", show_default=False,
                                                    help="Also write every event to this file (events.json)."),
           output: OutputOpt = Output.TABLE) -> None:
    """The task's timeline (each step with its time)."""
    result = {"task": task, "events": rpc_items(ctx, "events", "list", {"task": task}),
              "timeline": rpc(ctx, "events", "timeline", {"task": task})["timeline"]}
    if json_file:
        json_file = absolute(json_file)
        json_file.write_text(json.dumps(result, indent=2))
        err_console.print(f"wrote {json_file}", highlight=False)
    show(result, output, _timeline_table)


@app.command("metrics")
def metrics(ctx: typer.Context, task: str = typer.Argument(..., help="Task id."), run: int | None = RunOpt,
            csv_path: Path | None = typer.Option(None, "--csv", show_default=False,
                                                    help="CSV file (default: TASK-runN-metrics.csv)."),
            plot: Path | None = typer.Option(None, "--plot", show_default=False,
                                                help="Draw loss and accuracy per round to this PNG."),
            output: OutputOpt = Output.TABLE) -> None:
    """Per-round metrics of a run: a table, a CSV file and optionally a plot."""
    args = {"task": task, **({"run": run} if run else {})}
    first = rpc(ctx, "tasks", "metrics", {**args, "limit": 1})
    rows = rpc_items(ctx, "tasks", "metrics", {**args, "run": first["run"]})
    result = {"task": task, "run": first["run"], "rounds": rows}
    columns = ["round", *sorted({k for r in rows for k in r} - {"round"})]

    def table(_: Any) -> Table:
        built = Table(*columns, title=f"{task} run {result['run']}")
        for r in rows:
            built.add_row(*[f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns])
        return built

    show(result, output, table)
    csv_path = absolute(csv_path or Path(f"{task}-run{result['run']}-metrics.csv"))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    err_console.print(f"wrote {csv_path}", highlight=False)
    if plot:
        from fedmq.plots import plot_metrics

        plot = absolute(plot)
        try:
            plot_metrics(rows, plot, f"{task} — run {result['run']}")
        except RuntimeError as exc:  # matplotlib missing
            fail(ExitCode.BAD_INPUT, str(exc))
        err_console.print(f"wrote {plot}", highlight=False)


@app.command("model")
def model(ctx: typer.Context, task: str = typer.Argument(..., help="Task id."),
          output: Path = typer.Option(..., "-o", "--output", help="Where to write model.npz."),
          run: int | None = RunOpt) -> None:
    """Download the final global model a run saved (sha256-checked)."""
    output = absolute(output)
    args = {"task": task, **({"run": run} if run else {})}
    with Session(globals_of(ctx), "tasks") as session:
        first = session.call("tasks", "model", {**args, "offset": 0})
        sha = hashlib.sha256(first["data"])
        with output.open("wb") as out, progress() as bar:
            line = bar.add_task(f"model {task}", total=first["size"])
            out.write(first["data"])
            bar.advance(line, len(first["data"]))
            offset = len(first["data"])
            while offset < first["size"]:
                part = session.call("tasks", "model", {**args, "offset": offset})
                out.write(part["data"])
                sha.update(part["data"])
                offset += len(part["data"])
                bar.advance(line, len(part["data"]))
    if sha.hexdigest() != first["sha256"]:
        output.unlink(missing_ok=True)
        fail(ExitCode.REMOTE_ERROR, "the downloaded model does not match its digest")
    err_console.print(f"wrote {output} ({first['size']} bytes, run {first['run']}, sha256 {first['sha256'][:16]}…)",
                      highlight=False)


@app.command("logs")
def logs(ctx: typer.Context, task: str = typer.Argument(..., help="Task id."), run: int | None = RunOpt,
         lines: int = typer.Option(200, help="How many of the last lines."),
         output: OutputOpt = Output.TABLE) -> None:
    """The server log of a run (as text, or JSON)."""
    result = rpc(ctx, "tasks", "logs", {"task": task, "lines": lines, **({"run": run} if run else {})})
    if output is Output.JSON:
        show(result, output)
    else:
        typer.echo("\n".join(result["lines"]))


def fingerprints(data: dict[str, Any], most: int = 3) -> str:
    """The devices' data fingerprints in a cell: each distinct short digest with how many devices
    trained on it (``3f2a9c01×2 77b0e4d2×1``), the commonest first."""
    counts: dict[str, int] = {}
    for fingerprint in data.values():
        short = str(fingerprint.get("digest", ""))[:8]
        counts[short] = counts.get(short, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    text = " ".join(f"{digest}×{n}" for digest, n in ranked[:most])
    return text + (f" +{len(ranked) - most} more" if len(ranked) > most else "") or "-"


def _runs_table(rows: list[dict[str, Any]]) -> Table:
    table = Table("run", "state", "started", "duration", "rev", "mode", "bundle", "cohort", "data", "args")
    for r in rows:
        duration = f"{r['finished'] - r['started']:.1f}s" if r.get("finished") else "-"
        revision = r.get("revision") or {}
        table.add_row(str(r["run"]), r["state"], ago(r["started"]), duration, str(revision.get("revision") or "-"),
                      revision.get("mode") or "-", (revision.get("bundle") or "")[:12], str(len(r.get("cohort") or [])),
                      fingerprints(r.get("data") or {}), json.dumps(revision.get("args") or {}))
    return table


@app.command("runs")
def runs(ctx: typer.Context, task: str = typer.Argument(..., help="Task id."),
         output: OutputOpt = Output.TABLE) -> None:
    """Every run of a task: its revision, cohort and their data fingerprints (fedmq run show TASK:RUN for one)."""
    show(rpc_items(ctx, "tasks", "runs", {"task": task}), output, _runs_table)
