"""``fedmq cloud``: the cloud services in the foreground."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import typer

from fedmq.broker.connection import BrokerUnavailable
from fedmq.broker.topics import DEFAULT_PREFIX
from fedmq.cli.common import ExitCode, console, err_console, fail, globals_of


def register(app: typer.Typer) -> None:
    app.command()(cloud)


def cloud(ctx: typer.Context,
          home: Path = typer.Option(Path("fedmq-cloud"), "--home", envvar="FEDMQ_CLOUD_HOME",
                                    help="Folder for the bundle store, task runs and the SQLite database."),
          db: str | None = typer.Option(None, "--db", envvar="FEDMQ_DB", show_default=False,
                                           help="Database URL (default: SQLite in --home; or postgresql://user@host/db)."),
          services: str | None = typer.Option(None, show_default=False, help="Comma-separated services to run "
                                              "(default: all of bundles, devices, tasks, events, identities, "
                                              "models, fleet, deployments)."),
          trusted_key: list[Path] = typer.Option([], "--trusted-key", help="Accept uploads signed by "
                                                 "this public key (file or folder); repeatable."),
          require_signed: bool = typer.Option(False, help="Refuse unsigned bundle uploads and unsigned deployments."),
          allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Development only: run server code "
                                              "and triggers from bundles no trusted key signed."),
          dynsec: bool = typer.Option(False, "--dynsec", help="Manage identities (fedmq device add, fedmq operator "
                                      "add) with the broker's dynamic-security plugin; the cloud's broker user "
                                      "needs its admin role."),
          chunk_size: int = typer.Option(64 * 1024, help="Bytes per retained bundle chunk."),
          flower_bind: str = typer.Option("0.0.0.0", help="Interface Flower servers listen on."),
          flower_advertise: str = typer.Option("127.0.0.1", help="Host devices use to reach Flower servers."),
          client_id: str = typer.Option("fedmq-cloud", help="MQTT client id (persistent session)."),
          shared_group: str | None = typer.Option(None, show_default=False, help="Share requests with other "
                                                  "replicas through $share/<group>/ (Mosquitto, EMQX, ...)."),
          write_delay_ms: float = typer.Option(5.0, min=0, max=10_000,
                                               help="Presence updates wait up to this long to share one "
                                                    "transaction (answered writes never wait).")) -> None:
    """Run the cloud services in the foreground (all in one process by default)."""
    from fedmq.cloud.app import CloudApp, CloudConfig

    g = globals_of(ctx)
    chosen = {"services": tuple(s.strip() for s in services.split(",") if s.strip())} if services else {}
    config = CloudConfig(broker=g.broker_url, prefix=g.prefix or DEFAULT_PREFIX, home=home, db=db,
                         client_id=client_id, trusted_keys=trusted_key, require_signed=require_signed,
                         chunk_size=chunk_size, shared_group=shared_group, write_delay_s=write_delay_ms / 1000,
                         **chosen,
                         flower_bind=flower_bind, flower_advertise=flower_advertise,
                         allow_unsigned=allow_unsigned, dynsec=dynsec)
    try:
        cloud_app = CloudApp(config)
        cloud_app.start()
    except BrokerUnavailable as exc:
        fail(ExitCode.UNREACHABLE, str(exc))
    except OSError as exc:
        fail(ExitCode.BAD_INPUT, f"cannot use {exc.filename or config.home}: {exc.strerror or exc}")
    except (ValueError, RuntimeError) as exc:
        fail(ExitCode.BAD_INPUT, str(exc))
    if allow_unsigned:
        err_console.print("[yellow]warning:[/yellow] --allow-unsigned: this cloud runs server code from bundles no "
                          "trusted key signed (development only)")
    settings = cloud_app.connection.settings  # its url never carries the password
    who = f" as {settings.username}" if settings.username else ""
    console.print(f"fedmq cloud serving {', '.join(sorted(cloud_app.server.services))} on "
                  f"{settings.url}{who} (home {config.home})", highlight=False)

    def on_term(*_: Any) -> None:  # stop like Ctrl-C: running tasks' servers are stopped too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    cloud_app.serve_forever()
