"""``fedmq edge`` without the operator CLI's weight: the agent is a long-running service on small
devices, and typer, rich and click would stay in its memory for its whole life.

``lean_args`` reads the command lines a device runs (``fedmq [--broker URL] [--prefix P] [-v]
edge --device-id … --label K=V …``) with the same option names and environment variables as
the typer command in ``fedmq.cli.edge`` (a test keeps the two in step).  Anything it does not
recognise -- ``--help``, ``--version``, an unknown option, a bad value -- returns ``None`` and
the full CLI takes over, so help and usage errors are exactly typer's.  ``serve`` is the
command's body, shared by both paths.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The root options fedmq edge uses (name -> envvar); --caller is read and ignored, like typer does.
ROOT_VALUES = {"--broker": "FEDMQ_BROKER", "-b": "FEDMQ_BROKER", "--caller": "FEDMQ_CALLER",
               "--prefix": "FEDMQ_PREFIX"}
ROOT_FLAGS = ("--verbose", "-v")
# The edge command's options: flag -> (parameter, envvar, repeatable, type).
EDGE_VALUES: dict[str, tuple[str, str | None, bool, Callable[[str], Any]]] = {
    "--device-id": ("device_id", "FEDMQ_DEVICE_ID", False, str),
    "--config": ("config", "FEDMQ_EDGE_CONFIG", False, Path),
    "--alternate": ("alternate", None, True, str),
    "--work-dir": ("work_dir", "FEDMQ_WORK_DIR", False, Path),
    "--data-dir": ("data_dir", "FEDMQ_DATA_DIR", False, Path),
    "--trust": ("trust", None, True, Path),
    "--policy": ("policy", None, False, str),
    "--recheck-interval": ("recheck_interval", None, False, float),
    "--report-interval": ("report_interval", None, False, float),
    "--label": ("label", None, True, str),
}
EDGE_FLAGS = {"--allow-unsigned": "allow_unsigned"}


class BadInput(Exception):
    """A configuration the agent cannot start with (exit code 4)."""


def _split(argv: list[str], i: int) -> tuple[str, str | None, int]:
    """The option at ``argv[i]`` and its attached value (``--opt=value``), and the next index."""
    name, eq, value = argv[i].partition("=")
    return (name, value, i + 1) if eq and name.startswith("--") else (argv[i], None, i + 1)


def lean_args(argv: list[str], environ: dict[str, str] | os._Environ[str] = os.environ) -> dict[str, Any] | None:
    """``argv`` (without the program name) as ``serve``'s keyword arguments, or ``None`` when
    it is not a plain ``fedmq … edge …`` command line."""
    root: dict[str, str] = {}
    verbose, broker_on_command_line = False, False
    i = 0
    while i < len(argv) and argv[i] != "edge":
        name, value, i = _split(argv, i)
        if name in ROOT_FLAGS and value is None:
            verbose = True
        elif name in ROOT_VALUES:
            if value is None:
                if i >= len(argv):
                    return None
                value, i = argv[i], i + 1
            root[ROOT_VALUES[name]] = value
            broker_on_command_line = broker_on_command_line or ROOT_VALUES[name] == "FEDMQ_BROKER"
        else:
            return None
    if i >= len(argv):
        return None
    i += 1
    params: dict[str, Any] = {p: [] for p, _, many, _t in EDGE_VALUES.values() if many}
    while i < len(argv):
        name, value, i = _split(argv, i)
        if name in EDGE_FLAGS and value is None:
            params[EDGE_FLAGS[name]] = True
            continue
        if name not in EDGE_VALUES:
            return None
        param, _env, many, kind = EDGE_VALUES[name]
        if value is None:
            if i >= len(argv):
                return None
            value, i = argv[i], i + 1
        try:
            converted = kind(value)
        except ValueError:
            return None
        if many:
            params[param].append(converted)
        else:
            params[param] = converted
    for param, env, _many, kind in EDGE_VALUES.values():
        if env and param not in params and environ.get(env):  # click ignores an empty variable
            params[param] = kind(environ[env])
    labels = {}
    for item in params.pop("label"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            return None  # typer says what is wrong with it
        labels[key] = value
    broker = root.get("FEDMQ_BROKER") or environ.get("FEDMQ_BROKER") or None
    prefix = root.get("FEDMQ_PREFIX") or environ.get("FEDMQ_PREFIX") or None
    return dict(params, labels=labels, broker=broker, broker_on_command_line=broker_on_command_line,
                prefix=prefix, verbose=verbose)


def serve(*, broker: str | None, broker_on_command_line: bool, prefix: str | None, device_id: str | None = None,
          config: Path | None = None, alternate: list[str] | None = None, work_dir: Path | None = None,
          data_dir: Path | None = None, trust: list[Path] | None = None, allow_unsigned: bool | None = None,
          policy: str | None = None, recheck_interval: float | None = None, report_interval: float | None = None,
          labels: dict[str, str] | None = None, say: Callable[[str], None] = print) -> None:
    """Build the agent from the configuration and run it until SIGTERM or Ctrl-C.  Raises
    ``BadInput`` when the configuration cannot be used."""
    from fedmq.edge.lean_paho import import_paho_lean

    import_paho_lean()  # before anything imports paho: see there why
    from fedmq.broker.urls import with_absolute_files
    from fedmq.edge.agent import EdgeAgent
    from fedmq.edge.config import load_edge_config

    # The device's config file names its own broker and credentials: an operator's FEDMQ_BROKER in
    # the same shell must not replace them (a --broker typed on this command line still does).
    broker = broker if broker_on_command_line or config is None else None
    broker = with_absolute_files(broker) if broker else broker
    overrides = dict(device_id=device_id, broker=broker, alternates=alternate or [], prefix=prefix,
                     work_dir=work_dir, data_dir=data_dir, trusted_keys=trust or [], allow_unsigned=allow_unsigned,
                     policy=policy, recheck_interval_s=recheck_interval, report_interval_s=report_interval,
                     labels=labels or None)
    try:
        agent = EdgeAgent(load_edge_config(config, overrides))
    except (ValueError, OSError) as exc:  # a SigningError (a bad trusted key) is a ValueError
        raise BadInput(str(exc)) from None
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    say(f"fedmq edge {agent.device} -> {agent.connection.settings.url} (policy {agent.config.policy})")
    try:
        agent.run()
    except KeyboardInterrupt:
        agent.stop()


def run_lean(argv: list[str]) -> bool:
    """Run ``fedmq edge`` from ``argv`` if it is a plain command line; ``False`` if the full CLI
    must handle it.  Exits the process with the command's exit code otherwise."""
    args = lean_args(argv)
    if args is None:
        return False
    verbose = args.pop("verbose")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(**args, say=lambda line: print(line, flush=True))
    except KeyboardInterrupt:  # before the agent took over SIGTERM (fedmq.cli.run's handler)
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # ExitCode.INTERRUPTED
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)  # fedmq.cli.common.fail's words, without colour
        sys.exit(4)  # ExitCode.BAD_INPUT
    sys.exit(0)
