"""What every ``fedmq`` verb shares: the global options, connecting, calling, exit codes, output.

Exit codes (also in ``fedmq --help`` and docs/cli.md):

====  ========================================================================================
0     done
1     the service answered with an error, or the thing waited for ended badly (a failed task,
      a failed demo)
2     usage: an unknown option, a bad value for one (click's own code)
3     the broker could not be reached, or the service did not answer
4     bad local input: a file or folder that cannot be read or used (a key, a task folder)
130   interrupted
====  ========================================================================================

Results go to stdout (a table, or JSON with ``--output json``); messages and progress bars go
to stderr, so ``fedmq task list --output json | jq`` sees only JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from fedmq.broker.connection import DEFAULT_URL, BrokerUnavailable, MqttConnection, new_client_id
from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.topics import DEFAULT_PREFIX, Topics


def _console(stderr: bool) -> Console:
    """On a terminal, its width; elsewhere (a pipe, a log, CI) wide enough that tables keep their
    columns and a message stays on one line."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=200, soft_wrap=stderr)


console = _console(stderr=False)
err_console = _console(stderr=True)
SERVICE_WAIT_S = 20.0


class ExitCode(IntEnum):
    OK = 0
    REMOTE_ERROR = 1
    USAGE = 2
    UNREACHABLE = 3
    BAD_INPUT = 4
    INTERRUPTED = 130


class Output(StrEnum):
    TABLE = "table"
    JSON = "json"


OutputOpt = Annotated[Output, typer.Option("--output", help="table for people, json for programs (on stdout).")]


@dataclass
class Globals:
    """The root options, shared by every verb (``fedmq --broker URL task list``)."""

    broker: str | None
    caller: str
    prefix: str | None
    broker_on_command_line: bool = False  # not from FEDMQ_BROKER (the demo only takes it so)

    @property
    def broker_url(self) -> str:
        return self.broker or DEFAULT_URL

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix or DEFAULT_PREFIX)


def globals_of(ctx: typer.Context) -> Globals:
    root = ctx.find_root()
    if not isinstance(root.obj, Globals):  # a sub-app run on its own (tests, embedding)
        root.obj = Globals(None, "operator", None)
    return root.obj


def fail(code: ExitCode, message: str, label: str = "error") -> NoReturn:
    err_console.print(f"[red]{label}:[/red] {message}", highlight=False)
    raise typer.Exit(int(code))


def connect(g: Globals, kind: str = "cli") -> MqttConnection:
    # Credentials bound to one client id (a task's, in its triggers) say which in FEDMQ_CLIENT_ID.
    client_id = os.environ.get("FEDMQ_CLIENT_ID") or new_client_id(f"{kind}-{g.caller}")
    connection = MqttConnection(client_id, g.broker_url)
    try:
        connection.start(timeout=5.0, fail_fast=True)
    except BrokerUnavailable as exc:
        fail(ExitCode.UNREACHABLE, f"{exc}: start one (fedmq broker, or your Mosquitto) or point "
                                   "--broker / FEDMQ_BROKER at it")
    return connection


class Session:
    """A connection and an RPC client for one command; a context manager that disconnects."""

    def __init__(self, g: Globals, service: str | None = None) -> None:
        self.g = g
        self.connection = connect(g)
        self.client = RpcClient(self.connection, g.caller, g.topics).start()
        if service is not None:
            self.wait_for(service)

    def wait_for(self, service: str) -> None:
        """A cloud started a moment ago may not be listening yet, and a request nobody listens
        to is lost: ask ``ping`` first, for up to SERVICE_WAIT_S."""
        def on_wait() -> None:
            err_console.print(f"waiting for the {service} service on {self.connection.settings.url} "
                              f"(up to {SERVICE_WAIT_S:g} s)…")
        try:
            self.client.wait_for_service(service, SERVICE_WAIT_S, on_wait=on_wait)
        except RpcError as exc:
            self.close()
            if exc.code is ErrorCode.TIMEOUT:
                fail(ExitCode.UNREACHABLE, f"no answer from a service named {service!r} within {SERVICE_WAIT_S:g} s "
                     f"on {self.connection.settings.url} (prefix {self.g.topics.prefix}): is fedmq cloud running "
                     "there, with that service (bundles, devices, tasks, events, identities, models, fleet, "
                     "deployments)?", "timeout")
            fail(ExitCode.REMOTE_ERROR, exc.message, exc.code.value)

    def call(self, service: str, method: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        try:
            return self.client.call(service, method, args or {}, timeout=timeout)
        except RpcError as exc:
            self.close()
            fail(ExitCode.UNREACHABLE if exc.code is ErrorCode.TIMEOUT else ExitCode.REMOTE_ERROR,
                 exc.message, exc.code.value)

    def close(self) -> None:
        self.connection.stop()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rpc(ctx: typer.Context, service: str, method: str, args: dict[str, Any] | None = None,
        timeout: float = 30.0) -> Any:
    """One call, start to end: connect, wait for the service, call, disconnect."""
    with Session(globals_of(ctx), service) as session:
        return session.call(service, method, args, timeout)


def rpc_items(ctx: typer.Context, service: str, method: str, args: dict[str, Any] | None = None) -> list[Any]:
    """Every item of a list method, page after page."""
    with Session(globals_of(ctx), service) as session:
        try:
            return session.client.all_items(service, method, args)
        except RpcError as exc:
            session.close()
            fail(ExitCode.UNREACHABLE if exc.code is ErrorCode.TIMEOUT else ExitCode.REMOTE_ERROR,
                 exc.message, exc.code.value)


def json_arg(value: str | None, name: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=name) from None


def ago(ts: float | None) -> str:
    if not ts:
        return "-"
    seconds = max(0.0, time.time() - ts)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago" if seconds < 7200 \
        else f"{seconds / 3600:.1f}h ago"


def show(result: Any, output: Output, table: Callable[[Any], Any] | None = None) -> None:
    """A read verb's result: JSON on stdout, or the table ``table(result)`` builds."""
    if output is Output.JSON or table is None:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        console.print(table(result))


def progress() -> Any:
    """A transfer progress bar on stderr (shown on a terminal only)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=err_console,
                    disable=not err_console.is_terminal)
