"""The ``fedmq`` command.  Every subcommand that talks to services does so over MQTT RPC."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from fedmq.broker.connection import BrokerUnavailable, MqttConnection, new_client_id
from fedmq.broker.envelope import RpcError
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.topics import DEFAULT_PREFIX, Topics
from fedmq import __version__
from fedmq.ftdl.paths import absolute

app = typer.Typer(help="fedmq: federated-learning tasks on device fleets, over MQTT.",
                  no_args_is_help=True, add_completion=False)
console = Console()
err_console = Console(stderr=True)

BrokerOpt = typer.Option("mqtt://127.0.0.1:1883", "--broker", "-b", envvar="FEDMQ_BROKER",
                         help="Broker URL (mqtt://user:pass@host:port, mqtts:// for TLS).")
CallerOpt = typer.Option("operator", "--caller", envvar="FEDMQ_CALLER",
                         help="Who we are on the wire (with an ACL: the MQTT username).")
PrefixOpt = typer.Option(DEFAULT_PREFIX, "--prefix", envvar="FEDMQ_PREFIX", help="Topic prefix.")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug output.")) -> None:
    _setup_logging(verbose)


@app.command()
def version() -> None:
    """Print the fedmq version."""
    console.print(__version__)


@app.command()
def broker(host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
           port: Optional[int] = typer.Option(None, help="TCP port; 0 picks a free one. Default: 1883, "
                                              "or a free one with --detach.", show_default=False),
           user: list[str] = typer.Option([], "--user", help="USER:PASSWORD; repeat for more. "
                                          "Without any, anonymous clients are allowed."),
           detach: bool = typer.Option(False, "--detach", help="Start in the background and print "
                                       "shell exports (FEDMQ_BROKER, FEDMQ_BROKER_PID): eval \"$(fedmq broker --detach)\"."),
           log_file: Path = typer.Option(Path("fedmq-broker.log"), "--log-file",
                                         help="With --detach: where the broker's log goes."),
           ready_fd: Optional[int] = typer.Option(None, "--ready-fd", hidden=True)) -> None:
    """Run the embedded MQTT broker (amqtt, MQTT 3.1.1) in the foreground, or detached."""
    from fedmq.broker.embedded import EmbeddedBroker

    if detach:
        _detach_broker(host, 0 if port is None else port, user, absolute(log_file))
        return
    port = 1883 if port is None else port

    users: dict[str, str] = {}
    for entry in user:
        name, sep, password = entry.partition(":")
        if not sep or not name or not password:
            raise typer.BadParameter(f"expected USER:PASSWORD, got {entry!r}", param_hint="--user")
        users[name] = password
    embedded = EmbeddedBroker(host, port, users)
    try:
        embedded.start()
    except RuntimeError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    if ready_fd is not None:  # the --detach parent waits for this line
        with os.fdopen(ready_fd, "w") as ready:
            ready.write(embedded.url + "\n")
    import signal as _signal

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    _signal.signal(_signal.SIGTERM, on_term)
    console.print(f"embedded broker listening on {embedded.url} "
                  f"({'password auth' if users else 'anonymous'}); Ctrl-C stops it")
    embedded.serve_forever()


def _detach_broker(host: str, port: int, users: list[str], log_file: Path) -> None:
    """Start ``fedmq broker`` as a background process of its own and print where it listens,
    as shell exports (the ``eval "$(ssh-agent)"`` convention)."""
    import shlex
    import subprocess

    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "fedmq.cli", "broker", "--host", host, "--port", str(port),
            "--ready-fd", str(write_fd), *[a for u in users for a in ("--user", u)]]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        url = ready.readline().strip()  # empty if the broker died first
    if not url:
        proc.wait(10)
        err_console.print(f"[red]error:[/red] the broker did not start (exit {proc.returncode}); see {log_file}")
        sys.stdout.write("false\n")  # so that eval "$(fedmq broker --detach)" fails too
        raise typer.Exit(1)
    err_console.print(f"embedded broker on {url} (pid {proc.pid}, log {log_file}); stop it with kill {proc.pid}")
    sys.stdout.write(f"export FEDMQ_BROKER={shlex.quote(url)}\nexport FEDMQ_BROKER_PID={proc.pid}\n")


SERVICE_WAIT_S = 20.0


def rpc_client(broker_url: str, caller: str, prefix: str, service: str | None = None) -> RpcClient:
    """Connect and return a ready client, or exit with a message a person can act on.  With
    ``service``, wait (up to SERVICE_WAIT_S) until it answers: a cloud started a moment ago
    may not be listening yet, and a request nobody listens to is lost."""
    connection = MqttConnection(new_client_id(f"cli-{caller}"), broker_url)
    try:
        connection.start(timeout=5.0)
    except BrokerUnavailable as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    client = RpcClient(connection, caller, Topics(prefix)).start()
    if service is not None:
        def on_wait() -> None:
            err_console.print(f"waiting for the {service} service on {connection.settings.url} "
                              f"(up to {SERVICE_WAIT_S:g} s)…")
        try:
            client.wait_for_service(service, SERVICE_WAIT_S, on_wait=on_wait)
        except RpcError as exc:
            connection.stop()
            message = (f"no answer from the {service} service within {SERVICE_WAIT_S:g} s: is fedmq cloud "
                       f"running on {connection.settings.url} (prefix {prefix})?"
                       if exc.code.value == "timeout" else exc.message)
            err_console.print(f"[red]{exc.code.value}:[/red] {message}")
            raise typer.Exit(1) from None
    return client


def call_or_exit(client: RpcClient, service: str, method: str, args: dict[str, Any] | None = None,
                 timeout: float = 10.0) -> Any:
    try:
        return client.call(service, method, args or {}, timeout=timeout)
    except RpcError as exc:
        err_console.print(f"[red]{exc.code.value}:[/red] {exc.message}")
        raise typer.Exit(1) from None


@app.command()
def call(service: str = typer.Argument(..., help="Service name, e.g. tasks."),
         method: str = typer.Argument(..., help="Method name, e.g. ping."),
         args: str = typer.Option("{}", "--args", "-a", help="Arguments as a JSON object."),
         timeout: float = typer.Option(10.0, help="Seconds to wait for the reply."),
         broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Call any RPC method and print the result as JSON."""
    parsed = _json_opt(args, "--args")
    if not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--args")
    result = _rpc(service, method, parsed, broker_url, caller, prefix, timeout)
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")


# --- cloud -----------------------------------------------------------------------------------
@app.command()
def cloud(broker_url: str = BrokerOpt, prefix: str = PrefixOpt,
          home: Path = typer.Option(Path("fedmq-cloud"), "--home", envvar="FEDMQ_CLOUD_HOME",
                                    help="Folder for the bundle store, task runs and the SQLite database."),
          db: Optional[str] = typer.Option(None, "--db", envvar="FEDMQ_DB",
                                           help="Database URL (default sqlite in --home; postgresql://user@host/db)."),
          services: str = typer.Option("bundles,devices,tasks,events", help="Comma-separated services to run."),
          trusted_key: list[Path] = typer.Option([], "--trusted-key", help="Accept uploads signed by "
                                                 "this public key (file or folder); repeatable."),
          require_signed: bool = typer.Option(False, help="Refuse unsigned bundle uploads."),
          chunk_size: int = typer.Option(64 * 1024, help="Bytes per retained bundle chunk."),
          flower_bind: str = typer.Option("0.0.0.0", help="Interface Flower servers listen on."),
          flower_advertise: str = typer.Option("127.0.0.1", help="Host devices use to reach Flower servers."),
          client_id: str = typer.Option("fedmq-cloud", help="MQTT client id (persistent session)."),
          shared_group: Optional[str] = typer.Option(None, help="Share requests with other replicas "
                                                     "through $share/<group>/ (Mosquitto, EMQX, ...).")) -> None:
    """Run the cloud services in the foreground (all in one process by default)."""
    from fedmq.cloud.app import CloudApp, CloudConfig

    config = CloudConfig(broker=broker_url, prefix=prefix, home=home, db=db, client_id=client_id,
                         trusted_keys=trusted_key, require_signed=require_signed, chunk_size=chunk_size,
                         shared_group=shared_group, services=tuple(s.strip() for s in services.split(",") if s.strip()),
                         flower_bind=flower_bind, flower_advertise=flower_advertise)
    try:
        cloud_app = CloudApp(config)
        cloud_app.start()
    except (BrokerUnavailable, ValueError, RuntimeError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"fedmq cloud serving {', '.join(sorted(cloud_app.server.services))} on {broker_url}",
                  highlight=False)
    import signal as _signal

    def on_term(*_: Any) -> None:  # stop like Ctrl-C: running tasks' servers are stopped too
        raise KeyboardInterrupt

    _signal.signal(_signal.SIGTERM, on_term)
    cloud_app.serve_forever()


# --- tasks, devices, events ----------------------------------------------------------------------
task_app = typer.Typer(help="Create, start, stop and inspect tasks.", no_args_is_help=True)
device_app = typer.Typer(help="The device registry.", no_args_is_help=True)
app.add_typer(task_app, name="task")
app.add_typer(device_app, name="device")


def _rpc(service: str, method: str, args: dict[str, Any], broker_url: str, caller: str, prefix: str,
         timeout: float = 30.0) -> Any:
    client = rpc_client(broker_url, caller, prefix, service)
    try:
        return call_or_exit(client, service, method, args, timeout)
    finally:
        client.connection.stop()


def _json_opt(value: Optional[str], name: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=name) from None


def _ago(ts: Optional[float]) -> str:
    import time as _time

    if not ts:
        return "-"
    seconds = max(0, _time.time() - ts)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago" if seconds < 7200 else f"{seconds / 3600:.1f}h ago"


def _task_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table("id", "name", "state", "rev", "round", "priority", "flower", "tags", "bundle")
    colour = {"running": "green", "failed": "red", "finished": "blue", "stopped": "yellow"}
    for r in rows:
        rounds = f"{r['round']}/{r['total_rounds']}" if r.get("total_rounds") else str(r.get("round") or 0)
        state = f"[{colour.get(r['state'], 'white')}]{r['state']}[/]"
        table.add_row(r["id"], r["name"], state, str(r["revision"]), rounds, str(r["priority"]),
                      r["flower"] or "-", ",".join(r["tags"] or []), r["bundle"][:12])
    return table


@task_app.command("create")
def task_create(name: str = typer.Argument(..., help="Task name."),
                bundle: Optional[str] = typer.Option(None, help="Bundle digest (from fedmq bundle push)."),
                folder: Optional[str] = typer.Option(None, help="A task folder on the cloud host instead."),
                task_id: Optional[str] = typer.Option(None, "--id", help="Task id (default: NAME-<random>)."),
                criteria: str = typer.Option("", help="Selection criteria, e.g. 'data_quantity > 100'."),
                args: Optional[str] = typer.Option(None, help="Task arguments as a JSON object."),
                requirements: Optional[str] = typer.Option(None, help="Requirements as JSON (default: the bundle's)."),
                tag: list[str] = typer.Option([], "--tag", help="Tag; repeatable."),
                priority: int = typer.Option(0, help="Higher runs first."),
                flower_port: Optional[int] = typer.Option(None, help="Flower port (default: a free one at start)."),
                flower_host: Optional[str] = typer.Option(None, help="Host devices use to reach the Flower server."),
                broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Create a task."""
    if folder is not None:  # a path on the cloud host; relative to here if this is the cloud host
        folder = str(absolute(folder))
    payload = {k: v for k, v in dict(name=name, bundle=bundle, folder=folder, task=task_id, criteria=criteria,
                                     args=_json_opt(args, "--args"), requirements=_json_opt(requirements, "--requirements"),
                                     tags=tag or None, priority=priority, flower_port=flower_port,
                                     flower_host=flower_host).items() if v is not None}
    console.print(_task_table([_rpc("tasks", "create", payload, broker_url, caller, prefix)]))


@task_app.command("list")
def task_list(state: Optional[str] = typer.Option(None, help="Only tasks in this state."),
              tag: Optional[str] = typer.Option(None, help="Only tasks with this tag."),
              broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """List tasks."""
    args = {k: v for k, v in dict(state=state, tag=tag).items() if v is not None}
    console.print(_task_table(_rpc("tasks", "list", args, broker_url, caller, prefix)))


@task_app.command("get")
def task_get(task: str, broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Show one task as JSON."""
    sys.stdout.write(json.dumps(_rpc("tasks", "get", {"task": task}, broker_url, caller, prefix), indent=2) + "\n")


@task_app.command("update")
def task_update(task: str, criteria: Optional[str] = typer.Option(None), args: Optional[str] = typer.Option(None),
                priority: Optional[int] = typer.Option(None), bundle: Optional[str] = typer.Option(None),
                tag: list[str] = typer.Option([], "--tag"),
                broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Change criteria, arguments, priority, tags or bundle (a new revision)."""
    payload = {k: v for k, v in dict(task=task, criteria=criteria, args=_json_opt(args, "--args"),
                                     priority=priority, bundle=bundle, tags=tag or None).items() if v is not None}
    console.print(_task_table([_rpc("tasks", "update", payload, broker_url, caller, prefix)]))


@task_app.command("start")
def task_start(task: str, broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Start a task (its Flower server runs on the cloud host)."""
    console.print(_task_table([_rpc("tasks", "start", {"task": task}, broker_url, caller, prefix)]))


@task_app.command("wait")
def task_wait(task: str, timeout: float = typer.Option(3600.0, help="Give up after this many seconds."),
              broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Wait for a running task's run to end, with a progress bar of its rounds; exits 0 when it
    finished, 1 when it failed or was stopped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedmq.cloud.task_client import TaskWaitTimeout, wait_for_task

    connection = MqttConnection(new_client_id(f"cli-{caller}"), broker_url)
    try:
        connection.start(timeout=5.0)
    except BrokerUnavailable as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("rounds"),
                      TimeElapsedColumn(), console=err_console, disable=not err_console.is_terminal) as progress:
            bar = progress.add_task(f"{task}", total=None)

            def on_update(body: dict[str, Any]) -> None:
                progress.update(bar, completed=body.get("round") or 0, total=body.get("total_rounds"),
                                description=f"{task} ({body.get('state')}, run {body.get('run')})")

            final = wait_for_task(connection, Topics(prefix), task, timeout, on_update=on_update)
    except LookupError as exc:
        err_console.print(f"[red]not_found:[/red] {exc}")
        raise typer.Exit(1) from None
    except TaskWaitTimeout as exc:
        err_console.print(f"[red]timeout:[/red] {exc}")
        raise typer.Exit(1) from None
    finally:
        connection.stop()
    rounds = f"{final.get('round', 0)}/{final.get('total_rounds') or '?'} rounds"
    if final["state"] == "finished":
        err_console.print(f"{task} finished run {final.get('run')} ({rounds})")
        return
    reason = f": {final['last_error']}" if final.get("last_error") else ""
    err_console.print(f"[red]{task} {final['state']}[/red] in run {final.get('run')} after {rounds}{reason}")
    raise typer.Exit(1)


@task_app.command("stop")
def task_stop(task: str, broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Stop a running task; its devices are told to stop."""
    console.print(_task_table([_rpc("tasks", "stop", {"task": task}, broker_url, caller, prefix)]))


@task_app.command("delete")
def task_delete(task: str, broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Delete a task (stopping it first)."""
    _rpc("tasks", "delete", {"task": task}, broker_url, caller, prefix)
    console.print(f"deleted {task}")


@task_app.command("events")
def task_events(task: str, output: Optional[Path] = typer.Option(None, "--json", help="Write events.json here."),
                broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """The task's timeline (each step with its time); --json writes all events."""
    from rich.table import Table

    result = _rpc("events", "list", {"task": task}, broker_url, caller, prefix)
    if output:
        output = absolute(output)
        output.write_text(json.dumps(result, indent=2))
        err_console.print(f"wrote {output}")
    table = Table("step", "component", "device", "t (s)", "Δ (s)")
    for row in result["timeline"]:
        table.add_row(row["step"], row["component"], row["device"] or "", f"{row['t_s']:.3f}", f"{row['delta_s']:.3f}")
    console.print(table)


@task_app.command("metrics")
def task_metrics(task: str, run: Optional[int] = typer.Option(None, help="Run number (default: the latest)."),
                 csv_path: Optional[Path] = typer.Option(None, "--csv", help="CSV file (default: TASK-runN-metrics.csv)."),
                 plot: Optional[Path] = typer.Option(None, "--plot", help="Draw loss and accuracy per round to this PNG."),
                 broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Per-round metrics of a run: a table, a CSV file and optionally a plot."""
    import csv

    from rich.table import Table

    result = _rpc("tasks", "metrics", {"task": task, **({"run": run} if run else {})}, broker_url, caller, prefix)
    rows = result["rounds"]
    columns = ["round"] + sorted({k for r in rows for k in r} - {"round"})
    table = Table(*columns, title=f"{task} run {result['run']}")
    for r in rows:
        table.add_row(*[f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns])
    console.print(table)
    csv_path = absolute(csv_path or Path(f"{task}-run{result['run']}-metrics.csv"))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {csv_path}")
    if plot:
        from fedmq.plots import plot_metrics

        plot = absolute(plot)
        plot_metrics(rows, plot, f"{task} — run {result['run']}")
        console.print(f"wrote {plot}")


@task_app.command("model")
def task_model(task: str, output: Path = typer.Option(..., "-o", "--output", help="Where to write model.npz."),
               run: Optional[int] = typer.Option(None, help="Run number (default: the latest)."),
               broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Download the final global model a run saved."""
    import hashlib

    output = absolute(output)
    client = rpc_client(broker_url, caller, prefix, "tasks")
    try:
        args = {"task": task, **({"run": run} if run else {})}
        first = call_or_exit(client, "tasks", "model", {**args, "offset": 0})
        sha = hashlib.sha256(first["data"])
        with output.open("wb") as out, _progress() as progress:
            bar = progress.add_task(f"model {task}", total=first["size"])
            out.write(first["data"])
            progress.advance(bar, len(first["data"]))
            offset = len(first["data"])
            while offset < first["size"]:
                part = call_or_exit(client, "tasks", "model", {**args, "offset": offset})
                out.write(part["data"])
                sha.update(part["data"])
                offset += len(part["data"])
                progress.advance(bar, len(part["data"]))
    finally:
        client.connection.stop()
    if sha.hexdigest() != first["sha256"]:
        output.unlink(missing_ok=True)
        err_console.print("[red]error:[/red] the downloaded model does not match its digest")
        raise typer.Exit(1)
    console.print(f"wrote {output} ({first['size']} bytes, run {first['run']}, sha256 {first['sha256'][:16]}…)")


@task_app.command("logs")
def task_logs(task: str, run: Optional[int] = typer.Option(None, help="Run number (default: the latest)."),
              lines: int = typer.Option(200, help="How many of the last lines."),
              broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """The server log of a run."""
    result = _rpc("tasks", "logs", {"task": task, "lines": lines, **({"run": run} if run else {})},
                  broker_url, caller, prefix)
    sys.stdout.write("\n".join(result["lines"]) + "\n")


@task_app.command("runs")
def task_runs(task: str, broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Every run of a task."""
    from rich.table import Table

    table = Table("run", "state", "started", "duration", "bundle", "args")
    for r in _rpc("tasks", "runs", {"task": task}, broker_url, caller, prefix):
        duration = f"{r['finished'] - r['started']:.1f}s" if r.get("finished") else "-"
        table.add_row(str(r["run"]), r["state"], _ago(r["started"]), duration, (r.get("bundle") or "")[:12],
                      json.dumps(r.get("args") or {}))
    console.print(table)


@device_app.command("list")
def device_list(online: Optional[bool] = typer.Option(None, "--online/--offline", show_default=False,
                                                     help="Only online (or offline) devices; all by default."),
                broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """List devices."""
    from rich.table import Table

    rows = _rpc("devices", "list", {} if online is None else {"online": online}, broker_url, caller, prefix)
    table = Table("device", "online", "last seen", "disconnects", "data", "cpus", "memory MB", "task", "accuracy")
    for r in rows:
        info = r["info"] or {}
        table.add_row(r["id"], "[green]yes[/]" if r["online"] else "[red]no[/]", _ago(r["last_seen"]),
                      str(r["disconnections"]), str(info.get("data_quantity", "-")), str(info.get("cpu_count", "-")),
                      str(round(info["memory_mb"])) if info.get("memory_mb") else "-",
                      info.get("current_task") or "-",
                      f"{info['accuracy']:.3f}" if isinstance(info.get("accuracy"), (int, float)) else "-")
    console.print(table)


@device_app.command("get")
def device_get(device: str, broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Show one device as JSON."""
    sys.stdout.write(json.dumps(_rpc("devices", "get_info", {"device": device}, broker_url, caller, prefix), indent=2) + "\n")


# --- demo ------------------------------------------------------------------------------------
@app.command()
def demo(broker_url: Optional[str] = typer.Option(None, "--broker", "-b",
                                                  help="Use this broker instead of starting the embedded one."),
         scenario: str = typer.Option("basic", help="basic (AGATA's experiment 1) or failover (experiment 2)."),
         workdir: Path = typer.Option(Path("fedmq-demo"), help="Where logs, events.json and result.json go (emptied first)."),
         rounds: int = typer.Option(5, help="Federated rounds of the digits task.")) -> None:
    """Run the end-to-end demo: broker, cloud and two edges as processes; train digits; show the timeline."""
    from fedmq.demo import DemoError, main as demo_main

    logging.getLogger("fedmq").setLevel(logging.ERROR)
    try:
        summary = demo_main(broker_url, scenario, absolute(workdir), rounds, console)
    except DemoError as exc:
        err_console.print(f"[red]demo failed:[/red] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; every process the demo started has been stopped")
        raise typer.Exit(130) from None
    if summary["task"]["state"] != "finished":
        raise typer.Exit(1)


# --- dashboards ------------------------------------------------------------------------------
@app.command()
def dashboards(broker_url: str = BrokerOpt,
               port: int = typer.Option(1880, help="HTTP port of Node-RED (dashboard at /dashboard)."),
               user_dir: Path = typer.Option(Path("fedmq-dashboards"), "--user-dir",
                                             help="Node-RED's folder (the flows are copied there at each start).")) -> None:
    """Run Node-RED with the fedmq dashboards against a broker (installs Node-RED with npm if needed)."""
    from fedmq.node_red import DashboardError, run_node_red

    try:
        run_node_red(broker_url, port, absolute(user_dir), console)
    except DashboardError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


# --- edge ------------------------------------------------------------------------------------
@app.command()
def edge(device_id: Optional[str] = typer.Option(None, "--device-id", envvar="FEDMQ_DEVICE_ID", help="This device's id."),
         config: Optional[Path] = typer.Option(None, "--config", envvar="FEDMQ_EDGE_CONFIG", help="TOML config file."),
         broker_url: Optional[str] = typer.Option(None, "--broker", "-b", envvar="FEDMQ_BROKER", help="Broker URL."),
         alternate: list[str] = typer.Option([], "--alternate", help="Another broker URL to fail over to; repeatable."),
         prefix: Optional[str] = typer.Option(None, "--prefix", envvar="FEDMQ_PREFIX"),
         work_dir: Optional[Path] = typer.Option(None, "--work-dir", envvar="FEDMQ_WORK_DIR",
                                                 help="Bundle cache, run logs, state (default ./fedmq-edge)."),
         data_dir: Optional[Path] = typer.Option(None, "--data-dir", envvar="FEDMQ_DATA_DIR", help="The device's data."),
         trust: list[Path] = typer.Option([], "--trust", help="Trusted bundle signing key (.pub or folder); repeatable."),
         allow_unsigned: Optional[bool] = typer.Option(None, "--allow-unsigned", help="Run unsigned bundles (development only)."),
         policy: Optional[str] = typer.Option(None, "--policy", help="Task policy (at_most_one)."),
         recheck_interval: Optional[float] = typer.Option(None, "--recheck-interval", help="Safety-net re-check, seconds."),
         report_interval: Optional[float] = typer.Option(None, "--report-interval",
                                                         help="Report device info at least this often, seconds."),
         label: list[str] = typer.Option([], "--label", help="KEY=VALUE reported for selection; repeatable.")) -> None:
    """Run the edge agent of this device in the foreground."""
    import signal as _signal

    from fedmq.edge.agent import EdgeAgent
    from fedmq.edge.config import load_edge_config
    from fedmq.ftdl.signing import SigningError

    labels = {}
    for item in label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--label")
        labels[key] = value
    overrides = dict(device_id=device_id, broker=broker_url, alternates=alternate, prefix=prefix, work_dir=work_dir,
                     data_dir=data_dir, trusted_keys=trust, allow_unsigned=allow_unsigned, policy=policy,
                     recheck_interval_s=recheck_interval, report_interval_s=report_interval, labels=labels or None)
    try:
        agent = EdgeAgent(load_edge_config(config, overrides))
    except (ValueError, SigningError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    _signal.signal(_signal.SIGTERM, lambda *_: agent.stop())
    console.print(f"fedmq edge {agent.device} -> {agent.config.broker} (policy {agent.config.policy})", highlight=False)
    try:
        agent.run()
    except KeyboardInterrupt:
        agent.stop()


# --- keys and bundles --------------------------------------------------------------------------
keys_app = typer.Typer(help="Operator signing keys.", no_args_is_help=True)
bundle_app = typer.Typer(help="Task bundles: push to the cloud, list, fetch, remove.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(bundle_app, name="bundle")


@keys_app.command("new")
def keys_new(name: str = typer.Argument("operator", help="Key name: writes NAME.key and NAME.pub."),
             directory: Path = typer.Option(Path("."), "--dir", help="Where to write the key pair.")) -> None:
    """Create an Ed25519 key pair for signing bundles (give NAME.pub to devices)."""
    from fedmq.ftdl.signing import SigningError, SigningKey, generate_keypair

    try:
        private, public = generate_keypair(absolute(directory), name)
    except SigningError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"private key: {private} (keep it secret)\n"
                  f"public key:  {public} (key id {SigningKey.load(private).key_id}; give it to devices)")


def _progress() -> Any:
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err_console,
                    disable=not err_console.is_terminal)


@bundle_app.command("push")
def bundle_push(folder: Path = typer.Argument(..., exists=True, file_okay=False, help="Task folder."),
                key: Optional[Path] = typer.Option(None, "--key", envvar="FEDMQ_SIGNING_KEY",
                                                   help="Private key to sign with (fedmq keys new)."),
                chunk_size: int = typer.Option(64 * 1024, help="Upload chunk size in bytes."),
                window: int = typer.Option(8, help="Chunks in flight at once."),
                broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Pack, sign and upload a task folder to the cloud's bundle store; prints its digest."""
    from fedmq.cloud.bundle_client import push_folder
    from fedmq.ftdl.bundle import BundleError
    from fedmq.ftdl.manifest import ManifestError
    from fedmq.ftdl.signing import SigningError, SigningKey

    try:
        signing_key = SigningKey.load(key) if key else None
        client = rpc_client(broker_url, caller, prefix, "bundles")
        try:
            with _progress() as progress:
                bar = progress.add_task(f"push {folder.name}", total=None)
                result = push_folder(client, folder, key=signing_key, chunk_size=chunk_size, window=window,
                                     on_progress=lambda done, total: progress.update(bar, completed=done, total=total))
        finally:
            client.connection.stop()
    except RpcError as exc:
        err_console.print(f"[red]{exc.code.value}:[/red] {exc.message}")
        raise typer.Exit(1) from None
    except (BundleError, ManifestError, SigningError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    manifest = result.manifest
    signed = f"signed by {manifest.signer}" if manifest.signer else "UNSIGNED"
    err_console.print(f"pushed {manifest.task['name']}: {manifest.size} bytes, {len(manifest.files)} files, "
                      f"{signed}, {result.uploaded_chunks} chunk(s) uploaded")
    sys.stdout.write(manifest.digest + "\n")


@bundle_app.command("list")
def bundle_list(broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Bundles in the cloud's store."""
    from rich.table import Table

    rows = _rpc("bundles", "list", {}, broker_url, caller, prefix)
    table = Table("digest", "name", "bytes", "files", "signer")
    for row in rows:
        table.add_row(row["digest"][:16], str(row["name"]), str(row["size"]), str(row["files"]),
                      row["signer"] or "[red]unsigned[/red]")
    console.print(table)


@bundle_app.command("rm")
def bundle_rm(digest: str, broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Delete a bundle from the store and clear it from the broker."""
    _rpc("bundles", "remove", {"digest": digest}, broker_url, caller, prefix)
    console.print(f"removed {digest}")


@bundle_app.command("fetch")
def bundle_fetch(digest: str,
                 cache: Path = typer.Option(Path("fedmq-edge/cache"), "--cache", help="Bundle cache folder."),
                 trust: list[Path] = typer.Option([], "--trust", help="Trusted public key (file or folder)."),
                 allow_unsigned: bool = typer.Option(False, help="Accept unsigned bundles (development only)."),
                 window: int = typer.Option(8, help="Chunks requested at once."),
                 broker_url: str = BrokerOpt, prefix: str = PrefixOpt) -> None:
    """Fetch, verify and unpack a bundle as a device would (resumes an interrupted fetch)."""
    from fedmq.edge.bundle_fetch import BundleFetcher
    from fedmq.ftdl.bundle import BundleError
    from fedmq.ftdl.signing import SigningError
    from fedmq.ftdl.signing import TrustStore as _Trust

    try:
        trust_store = _Trust.from_paths(trust)
    except SigningError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    connection = MqttConnection(new_client_id("fetch"), broker_url)
    try:
        connection.start(timeout=5.0)
    except BrokerUnavailable as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    with _progress() as progress:
        bar = progress.add_task(f"fetch {digest[:12]}", total=None)

        def on_progress(done: int, total: int, manifest: Any) -> None:
            progress.update(bar, total=total * manifest.chunk_size, completed=done * manifest.chunk_size)
            if not err_console.is_terminal:
                sys.stdout.write(f"chunk {done}/{total}\n")
                sys.stdout.flush()

        fetcher = BundleFetcher(connection, Topics(prefix), absolute(cache), trust=trust_store,
                                allow_unsigned=allow_unsigned, window=window, on_progress=on_progress)
        try:
            result = fetcher.fetch(digest)
        except BundleError as exc:
            err_console.print(f"[red]refused ({exc.code}):[/red] {exc.message}")
            raise typer.Exit(1) from None
        finally:
            connection.stop()
    sys.stdout.write(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}) + "\n")


if __name__ == "__main__":  # pragma: no cover
    app()
