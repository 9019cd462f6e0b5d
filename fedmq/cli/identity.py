"""Identity verbs shared by ``fedmq device`` and ``fedmq operator``: create, rotate, revoke."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedmq.broker.urls import with_credentials
from fedmq.cli.common import err_console


def warn_if_not_enforced(reply: dict[str, Any]) -> None:
    if not reply.get("enforced"):
        err_console.print("[yellow]warning:[/yellow] this cloud does not manage broker credentials (start it with "
                          "--dynsec on a broker with the dynamic-security plugin): the role is recorded, but the "
                          "broker checks no password")


def broker_for(reply: dict[str, Any], url: str) -> str:
    return with_credentials(url, reply["name"], reply.get("password"))


def write_secret(path: Path, text: str) -> None:
    """Written readable by its owner only: it holds a password."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    err_console.print(f"wrote {path} (mode 600)", highlight=False)
