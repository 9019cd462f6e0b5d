"""``fedmq broker``: the embedded MQTT broker, in the foreground or detached."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

from fedmq.cli.common import ExitCode, console, err_console, fail
from fedmq.ftdl.paths import absolute


def register(app: typer.Typer) -> None:
    app.command()(broker)


def broker(host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for all)."),
           port: int | None = typer.Option(None, help="TCP port; 0 picks a free one. Default: 1883, "
                                              "or a free one with --detach.", show_default=False),
           user: list[str] = typer.Option([], "--user", help="USER:PASSWORD; repeat for more. "
                                          "Without any, anonymous clients are allowed."),
           detach: bool = typer.Option(False, "--detach", help="Start in the background and print "
                                       "shell exports (FEDMQ_BROKER, FEDMQ_BROKER_PID): "
                                       "eval \"$(fedmq broker --detach)\"."),
           log_file: Path = typer.Option(Path("fedmq-broker.log"), "--log-file",
                                         help="With --detach: where the broker's log goes."),
           ready_fd: int | None = typer.Option(None, "--ready-fd", hidden=True)) -> None:
    """Run the embedded MQTT broker (amqtt, MQTT 3.1.1) in the foreground, or detached."""
    from fedmq.broker.embedded import EmbeddedBroker

    users: dict[str, str] = {}
    for entry in user:
        name, sep, password = entry.partition(":")
        if not sep or not name or not password:
            raise typer.BadParameter(f"expected USER:PASSWORD, got {entry!r}", param_hint="--user")
        users[name] = password
    if detach:
        _detach(host, 0 if port is None else port, user, absolute(log_file))
        return
    embedded = EmbeddedBroker(host, 1883 if port is None else port, users)
    try:
        embedded.start()
    except RuntimeError as exc:
        fail(ExitCode.BAD_INPUT, str(exc))
    if ready_fd is not None:  # the --detach parent waits for this line
        with os.fdopen(ready_fd, "w") as ready:
            ready.write(embedded.url + "\n")

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Where it listens is this verb's result: stdout, for whoever started it to read.
    console.print(f"embedded broker listening on {embedded.url} "
                  f"({'password auth' if users else 'anonymous'}); Ctrl-C stops it", highlight=False)
    embedded.serve_forever()


def _detach(host: str, port: int, users: list[str], log_file: Path) -> None:
    """Start ``fedmq broker`` as a background process of its own and print where it listens,
    as shell exports (the ``eval "$(ssh-agent)"`` convention)."""
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
        sys.stdout.write("false\n")  # so that eval "$(fedmq broker --detach)" fails too
        fail(ExitCode.BAD_INPUT, f"the broker did not start (exit {proc.returncode}); see {log_file}")
    err_console.print(f"embedded broker on {url} (pid {proc.pid}, log {log_file}); stop it with kill {proc.pid}",
                      highlight=False)
    sys.stdout.write(f"export FEDMQ_BROKER={shlex.quote(url)}\nexport FEDMQ_BROKER_PID={proc.pid}\n")
