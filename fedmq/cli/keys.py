"""``fedmq keys …``: the operator's bundle signing keys."""

from __future__ import annotations

from pathlib import Path

import typer

from fedmq.cli.common import ExitCode, console, fail
from fedmq.ftdl.paths import absolute

app = typer.Typer(help="Operator signing keys.", no_args_is_help=True)


@app.command("new")
def new(name: str = typer.Argument("operator", help="Key name: writes NAME.key and NAME.pub."),
        directory: Path = typer.Option(Path("."), "--dir", help="Where to write the key pair.")) -> None:
    """Create an Ed25519 key pair for signing bundles (give NAME.pub to devices)."""
    from fedmq.ftdl.signing import SigningError, SigningKey, generate_keypair

    folder = absolute(directory)
    try:
        private, public = generate_keypair(folder, name)
    except SigningError as exc:
        fail(ExitCode.BAD_INPUT, str(exc))
    except OSError as exc:
        fail(ExitCode.BAD_INPUT, f"cannot write the key pair in {folder}: {exc.strerror or exc}")
    console.print(f"private key: {private} (keep it secret)\n"
                  f"public key:  {public} (key id {SigningKey.load(private).key_id}; give it to devices)",
                  highlight=False)
