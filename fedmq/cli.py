"""The ``fedmq`` command.  Every subcommand that talks to services does so over MQTT RPC."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from broker.connection import BrokerUnavailable, MqttConnection, new_client_id
from broker.envelope import RpcError
from broker.rpc_client import RpcClient
from broker.topics import DEFAULT_PREFIX, Topics
from fedmq import __version__

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
           port: int = typer.Option(1883, help="TCP port (0 picks a free one)."),
           user: list[str] = typer.Option([], "--user", help="USER:PASSWORD; repeat for more. "
                                          "Without any, anonymous clients are allowed.")) -> None:
    """Run the embedded MQTT broker (amqtt, MQTT 3.1.1) in the foreground."""
    from broker.embedded import EmbeddedBroker

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
    console.print(f"embedded broker listening on {embedded.url} "
                  f"({'password auth' if users else 'anonymous'}); Ctrl-C stops it")
    embedded.serve_forever()


def rpc_client(broker_url: str, caller: str, prefix: str) -> RpcClient:
    """Connect and return a ready client, or exit with a message a person can act on."""
    connection = MqttConnection(new_client_id(f"cli-{caller}"), broker_url)
    try:
        connection.start(timeout=5.0)
    except BrokerUnavailable as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    return RpcClient(connection, caller, Topics(prefix)).start()


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
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint="--args") from None
    if not isinstance(parsed, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--args")
    client = rpc_client(broker_url, caller, prefix)
    try:
        result = call_or_exit(client, service, method, parsed, timeout)
    finally:
        client.connection.stop()
    sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")


# --- cloud -----------------------------------------------------------------------------------
@app.command()
def cloud(broker_url: str = BrokerOpt, prefix: str = PrefixOpt,
          home: Path = typer.Option(Path("fedmq-cloud"), "--home", envvar="FEDMQ_CLOUD_HOME",
                                    help="Folder for the bundle store and the database."),
          trusted_key: list[Path] = typer.Option([], "--trusted-key", help="Accept uploads signed by "
                                                 "this public key (file or folder); repeatable."),
          require_signed: bool = typer.Option(False, help="Refuse unsigned bundle uploads."),
          chunk_size: int = typer.Option(64 * 1024, help="Bytes per retained bundle chunk."),
          client_id: str = typer.Option("fedmq-cloud", help="MQTT client id (persistent session)."),
          shared_group: Optional[str] = typer.Option(None, help="Share requests with other replicas "
                                                     "through $share/<group>/ (Mosquitto, EMQX, ...).")) -> None:
    """Run the cloud services in the foreground."""
    from cloud.app import CloudApp, CloudConfig

    config = CloudConfig(broker=broker_url, prefix=prefix, home=home, client_id=client_id,
                         trusted_keys=trusted_key, require_signed=require_signed,
                         chunk_size=chunk_size, shared_group=shared_group)
    try:
        cloud_app = CloudApp(config)
        cloud_app.start()
    except (BrokerUnavailable, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"fedmq cloud serving {', '.join(sorted(cloud_app.server.services))} on {broker_url}")
    cloud_app.serve_forever()


# --- keys and bundles --------------------------------------------------------------------------
keys_app = typer.Typer(help="Operator signing keys.", no_args_is_help=True)
bundle_app = typer.Typer(help="Task bundles: push to the cloud, list, fetch, remove.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(bundle_app, name="bundle")


@keys_app.command("new")
def keys_new(name: str = typer.Argument("operator", help="Key name: writes NAME.key and NAME.pub."),
             directory: Path = typer.Option(Path("."), "--dir", help="Where to write the key pair.")) -> None:
    """Create an Ed25519 key pair for signing bundles (give NAME.pub to devices)."""
    from ftdl.signing import SigningError, SigningKey, generate_keypair

    try:
        private, public = generate_keypair(directory, name)
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
    from cloud.bundle_client import push_folder
    from ftdl.bundle import BundleError
    from ftdl.manifest import ManifestError
    from ftdl.signing import SigningError, SigningKey

    try:
        signing_key = SigningKey.load(key) if key else None
        client = rpc_client(broker_url, caller, prefix)
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

    client = rpc_client(broker_url, caller, prefix)
    try:
        rows = call_or_exit(client, "bundles", "list")
    finally:
        client.connection.stop()
    table = Table("digest", "name", "bytes", "files", "signer")
    for row in rows:
        table.add_row(row["digest"][:16], str(row["name"]), str(row["size"]), str(row["files"]),
                      row["signer"] or "[red]unsigned[/red]")
    console.print(table)


@bundle_app.command("rm")
def bundle_rm(digest: str, broker_url: str = BrokerOpt, caller: str = CallerOpt, prefix: str = PrefixOpt) -> None:
    """Delete a bundle from the store and clear it from the broker."""
    client = rpc_client(broker_url, caller, prefix)
    try:
        call_or_exit(client, "bundles", "remove", {"digest": digest})
    finally:
        client.connection.stop()
    console.print(f"removed {digest}")


@bundle_app.command("fetch")
def bundle_fetch(digest: str,
                 cache: Path = typer.Option(Path("fedmq-edge/cache"), "--cache", help="Bundle cache folder."),
                 trust: list[Path] = typer.Option([], "--trust", help="Trusted public key (file or folder)."),
                 allow_unsigned: bool = typer.Option(False, help="Accept unsigned bundles (development only)."),
                 window: int = typer.Option(8, help="Chunks requested at once."),
                 broker_url: str = BrokerOpt, prefix: str = PrefixOpt) -> None:
    """Fetch, verify and unpack a bundle as a device would (resumes an interrupted fetch)."""
    from edge.bundle_fetch import BundleFetcher
    from ftdl.bundle import BundleError
    from ftdl.signing import SigningError
    from ftdl.signing import TrustStore as _Trust

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

        fetcher = BundleFetcher(connection, Topics(prefix), cache, trust=trust_store,
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
