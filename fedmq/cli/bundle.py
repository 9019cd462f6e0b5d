"""``fedmq bundle …``: task bundles -- push to the cloud, list, remove, fetch as a device would."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from fedmq.cli.common import (
    ExitCode,
    Output,
    OutputOpt,
    Session,
    connect,
    err_console,
    fail,
    globals_of,
    progress,
    rpc,
    rpc_items,
    show,
)
from fedmq.ftdl.paths import absolute

app = typer.Typer(help="Task bundles: push to the cloud, list, fetch, remove.", no_args_is_help=True)


@app.command("push")
def push(ctx: typer.Context,
         folder: Path = typer.Argument(..., help="Task folder (the one holding fedmq.toml)."),
         key: Path | None = typer.Option(None, "--key", envvar="FEDMQ_SIGNING_KEY", show_default=False,
                                            help="Private key to sign with (fedmq keys new)."),
         chunk_size: int = typer.Option(64 * 1024, help="Upload chunk size in bytes."),
         window: int = typer.Option(8, help="Chunks in flight at once.")) -> None:
    """Pack, sign and upload a task folder to the cloud's bundle store; prints its digest."""
    from fedmq.cloud.bundle_client import push_folder
    from fedmq.ftdl.bundle import BundleError
    from fedmq.ftdl.manifest import ManifestError
    from fedmq.ftdl.signing import SigningError, SigningKey

    folder = absolute(folder)
    if not folder.is_dir():
        fail(ExitCode.BAD_INPUT, f"{folder} is not a folder: give the task folder (the one holding fedmq.toml)"
             if folder.exists() else f"no task folder {folder}")
    try:
        signing_key = SigningKey.load(absolute(key)) if key else None
    except SigningError as exc:
        fail(ExitCode.BAD_INPUT, str(exc))
    with Session(globals_of(ctx), "bundles") as session:
        try:
            with progress() as bar:
                line = bar.add_task(f"push {folder.name}", total=None)
                result = push_folder(session.client, folder, key=signing_key, chunk_size=chunk_size, window=window,
                                     on_progress=lambda done, total: bar.update(line, completed=done, total=total))
        except (ManifestError, OSError) as exc:
            fail(ExitCode.BAD_INPUT, str(exc))
        except BundleError as exc:  # refused while packing: a link, a bad chunk size, ...
            fail(ExitCode.BAD_INPUT, exc.message)
        except Exception as exc:  # an RpcError from the cloud
            from fedmq.broker.envelope import RpcError

            if isinstance(exc, RpcError):
                fail(ExitCode.REMOTE_ERROR, exc.message, exc.code.value)
            raise
    manifest = result.manifest
    signed = f"signed by {manifest.signer}" if manifest.signer else "UNSIGNED"
    err_console.print(f"pushed {manifest.task['name']}: {manifest.size} bytes, {len(manifest.files)} files, "
                      f"{signed}, {result.uploaded_chunks} chunk(s) uploaded", highlight=False)
    if not manifest.signer:
        err_console.print("[yellow]warning:[/yellow] devices and clouds run only bundles signed by a key they trust; "
                          "sign it with --key (fedmq keys new) unless they run with --allow-unsigned (development)")
    sys.stdout.write(manifest.digest + "\n")


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table("digest", "name", "bytes", "files", "signer")
    for row in rows:
        table.add_row(row["digest"][:16], str(row["name"]), str(row["size"]), str(row["files"]),
                      row["signer"] or "[red]unsigned[/red]")
    return table


@app.command("list")
def list_(ctx: typer.Context, output: OutputOpt = Output.TABLE) -> None:
    """Bundles in the cloud's store."""
    show(rpc_items(ctx, "bundles", "list"), output, _table)


@app.command("rm")
def rm(ctx: typer.Context, digest: str = typer.Argument(..., help="Bundle digest.")) -> None:
    """Delete a bundle from the store and clear it from the broker."""
    rpc(ctx, "bundles", "remove", {"digest": digest})
    err_console.print(f"removed {digest}")


@app.command("fetch")
def fetch(ctx: typer.Context, digest: str = typer.Argument(..., help="Bundle digest."),
          cache: Path = typer.Option(Path("fedmq-edge/cache"), "--cache", help="Bundle cache folder."),
          trust: list[Path] = typer.Option([], "--trust", help="Trusted public key (file or folder); repeatable."),
          allow_unsigned: bool = typer.Option(False, help="Accept unsigned bundles (development only)."),
          window: int = typer.Option(8, help="Chunks requested at once.")) -> None:
    """Fetch, verify and unpack a bundle as a device would (resumes an interrupted fetch); prints
    the result as JSON."""
    from fedmq.edge.bundle_fetch import BundleFetcher
    from fedmq.ftdl.bundle import BundleError
    from fedmq.ftdl.signing import SigningError, TrustStore

    g = globals_of(ctx)
    try:
        trust_store = TrustStore.from_paths([absolute(p) for p in trust])
    except SigningError as exc:
        fail(ExitCode.BAD_INPUT, str(exc))
    connection = connect(g, "fetch")
    with progress() as bar:
        line = bar.add_task(f"fetch {digest[:12]}", total=None)

        def on_progress(done: int, total: int, manifest: Any) -> None:
            bar.update(line, total=total * manifest.chunk_size, completed=done * manifest.chunk_size)
            if not err_console.is_terminal:
                err_console.print(f"chunk {done}/{total}")

        fetcher = BundleFetcher(connection, g.topics, absolute(cache), trust=trust_store,
                                allow_unsigned=allow_unsigned, window=window, on_progress=on_progress)
        try:
            result = fetcher.fetch(digest)
        except BundleError as exc:
            fail(ExitCode.REMOTE_ERROR, exc.message, f"refused ({exc.code})")
        finally:
            connection.stop()
    sys.stdout.write(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}) + "\n")
