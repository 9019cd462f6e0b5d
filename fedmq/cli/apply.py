"""``fedmq apply FILE`` and ``fedmq diff FILE``: the fleet's desired state from a file (in Git).

Both read and validate the file here first -- TOML syntax, the schema, criteria, every bundle
folder packs -- so a bad file is refused with its line (``fleet.toml:12: tasks.a.args: ...``,
exit 4) before anything reaches the cloud.  A bundle folder (relative to the file's folder) is
packed here to learn its digest.  ``diff`` asks the cloud what differs; ``apply`` asks for that
plan (the cloud validates the file again and changes nothing), pushes the bundles the plan needs
(signed with ``--key``), signs the model of each deployment the plan creates, then applies.

``fedmq diff`` exits 0 when the fleet matches the file and 2 when it differs -- the convention of
``terraform plan -detailed-exitcode`` (1 stays "the service answered with an error", as for
every fedmq command; 3 unreachable; 4 a bad file).
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from fedmq.cli.common import ExitCode, Output, OutputOpt, Session, console, err_console, fail, globals_of, progress
from fedmq.ftdl.paths import absolute

DRIFT = 2  # fedmq diff: the fleet differs from the file (terraform plan -detailed-exitcode)
_COLOURS = {"create": "green", "update": "yellow", "start": "cyan", "stop": "magenta", "delete": "red"}
FileArg = typer.Argument(..., help="The fleet file (TOML), e.g. fleet.toml.", show_default=False)
PruneOpt = typer.Option(False, "--prune", help="Also delete the tasks an earlier apply of this fleet created "
                                               "that the file no longer names.")


def register(app: typer.Typer) -> None:
    app.command("apply")(apply)
    app.command("diff")(diff)


@dataclass
class Prepared:
    """A fleet file checked and its bundle folders packed (in ``tmp``, until ``close``)."""

    fleet: Any  # fedmq.cloud.fleet_file.FleetFile
    desired: dict[str, Any]
    key: Any = None  # the SigningKey of --key, if any
    bundles: dict[str, tuple[Any, Path]] = field(default_factory=dict)  # task id -> (manifest, archive)
    tmp: tempfile.TemporaryDirectory[str] | None = None

    def close(self) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


def _prepare(path: Path, key_path: Path | None) -> Prepared:
    """Read, validate and pack locally; exit 4 with every problem (each with its line) if any."""
    from fedmq.cloud.fleet_file import FleetFileError, load_fleet
    from fedmq.ftdl.bundle import BundleError, build_bundle
    from fedmq.ftdl.manifest import ManifestError
    from fedmq.ftdl.signing import SigningError, SigningKey

    shown = str(path)
    path = absolute(path)
    try:
        key = SigningKey.load(absolute(key_path)) if key_path else None
    except SigningError as exc:
        fail(ExitCode.BAD_INPUT, str(exc))
    try:
        fleet = load_fleet(path, display=shown)
    except FleetFileError as exc:
        fail(ExitCode.BAD_INPUT, "\n".join(exc.problems), "bad fleet file")
    except OSError as exc:
        fail(ExitCode.BAD_INPUT, f"cannot read {shown}: {exc.strerror or exc}")
    prepared = Prepared(fleet, fleet.spec.to_wire(), key, tmp=tempfile.TemporaryDirectory(prefix="fedmq-apply-"))
    built: dict[Path, tuple[Any, Path]] = {}
    problems = []
    for task_id, task in fleet.spec.tasks.items():
        if task.is_digest:
            continue
        folder = (path.parent / task.bundle).resolve()
        loc = ("tasks", task_id, "bundle")
        if not folder.is_dir():
            problems.append(fleet.problem(loc, f"no task folder {folder} (a folder relative to the file's, "
                                               "or a bundle digest)"))
            continue
        if folder not in built:
            archive = Path(prepared.tmp.name) / f"{len(built)}.tar.gz"  # type: ignore[union-attr]
            try:
                built[folder] = (build_bundle(folder, archive, key=key), archive)
            except (ManifestError, OSError) as exc:
                problems.append(fleet.problem(loc, f"{folder}: {exc}"))
                continue
            except BundleError as exc:
                problems.append(fleet.problem(loc, f"{folder}: {exc.message}"))
                continue
        prepared.bundles[task_id] = built[folder]
        prepared.desired["tasks"][task_id]["bundle"] = built[folder][0].digest
    if problems:
        prepared.close()
        fail(ExitCode.BAD_INPUT, "\n".join(problems), "bad fleet file")
    return prepared


def _sign(plan: list[dict[str, Any]], key: Any) -> dict[str, dict[str, str]]:
    """The operator's signature of each model a planned deployment rolls out (its name, version
    and the file's sha256 the plan names), as ``fedmq deploy start --key`` signs it."""
    from fedmq.ftdl.signing import model_signing_message

    if key is None:
        return {}
    signatures = {}
    for change in plan:
        if change["kind"] == "deployment" and change["action"] == "create":
            name, _, version = change["fields"]["model"][1].rpartition(":")
            message = model_signing_message(name, int(version), change["fields"]["sha256"][1])
            signatures[change["id"]] = {"signature": key.sign(message), "key_id": key.key_id}
    return signatures


def _advance(bar: Any, line: Any, done: int, total: int) -> None:
    bar.update(line, completed=done, total=total)


def _value(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "bundle" and isinstance(value, str):
        return value[:12]
    if name == "requirements" and isinstance(value, dict):  # the keys that say something
        value = {k: v for k, v in value.items() if v not in (None, [], {})}
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 60 else text[:59] + "…"


def changes_table(changes: list[dict[str, Any]], title: str) -> Table:
    table = Table("action", "kind", "id", "field", "old -> new", title=title)
    for change in changes:
        colour = _COLOURS.get(change["action"], "white")
        head = [f"[{colour}]{change['action']}[/]", change["kind"], change["id"]]
        fields = change.get("fields") or {}
        if not fields:
            table.add_row(*head, "-", "")
        for index, (name, (old, new)) in enumerate(fields.items()):
            table.add_row(*(head if index == 0 else ["", "", ""]), name,
                          f"{_value(name, old)} -> {_value(name, new)}")
    return table


def _show(changes: list[dict[str, Any]], output: Output, title: str) -> None:
    if output is Output.JSON:
        sys.stdout.write(json.dumps(changes, indent=2, default=str) + "\n")
    elif changes:
        console.print(changes_table(changes, title))


def diff(ctx: typer.Context, file: Path = FileArg, prune: bool = PruneOpt,
         output: OutputOpt = Output.TABLE) -> None:
    """What apply would change (nothing is changed).

    Exits 0 when the fleet matches the file, 2 when it differs (as terraform plan
    -detailed-exitcode), 1 when the cloud refuses the file, 4 for a bad file."""
    prepared = _prepare(file, None)
    try:
        with Session(globals_of(ctx), "fleet") as session:
            changes = session.call("fleet", "diff", {"desired": prepared.desired,
                                                     "source": prepared.fleet.source, "prune": prune})
    finally:
        prepared.close()
    _show(changes, output, f"{file}: {len(changes)} change(s) to apply")
    if not changes:
        err_console.print(f"in sync with {file}", highlight=False)
        return
    raise typer.Exit(DRIFT)


def apply(ctx: typer.Context, file: Path = FileArg, prune: bool = PruneOpt,
          key: Path | None = typer.Option(None, "--key", envvar="FEDMQ_SIGNING_KEY", show_default=False,
                                           help="Private key to sign the bundles pushed from folders and the "
                                                "models of new deployments with (fedmq keys new)."),
          output: OutputOpt = Output.TABLE) -> None:
    """Make the fleet's tasks and deployments what the file says: push its bundle folders, create,
    update, start, stop (and with --prune delete) tasks, start deployments.  Applying twice
    changes nothing the second time."""
    from fedmq.broker.envelope import RpcError
    from fedmq.cloud.bundle_client import upload

    prepared = _prepare(file, key)
    args = {"desired": prepared.desired, "source": prepared.fleet.source, "prune": prune}
    try:
        with Session(globals_of(ctx), "fleet") as session:
            plan = session.call("fleet", "diff", args)  # the cloud's check: nothing is pushed for a refused file
            needed = {c["id"] for c in plan if c["kind"] == "task" and c["id"] in prepared.bundles
                      and (c["action"] == "create" or "bundle" in c["fields"])}
            pushed: set[str] = set()
            for task_id in sorted(needed):
                manifest, archive = prepared.bundles[task_id]
                if manifest.digest in pushed:
                    continue
                try:
                    with progress() as bar:
                        line = bar.add_task(f"push {manifest.task['name']} for {task_id}", total=manifest.size)
                        upload(session.client, manifest, archive,
                               on_progress=functools.partial(_advance, bar, line))
                except RpcError as exc:
                    session.close()
                    fail(ExitCode.REMOTE_ERROR, f"pushing the bundle of {task_id}: {exc.message}", exc.code.value)
                pushed.add(manifest.digest)
                signed = f"signed by {manifest.signer}" if manifest.signer else "UNSIGNED"
                err_console.print(f"pushed {manifest.digest[:12]} ({manifest.size} bytes, {signed}) for {task_id}",
                                  highlight=False)
            signatures = _sign(plan, prepared.key)
            # Called when in sync too: the cloud records that this file (digest) was applied.
            changes = session.call("fleet", "apply", {**args, "signatures": signatures}, timeout=180.0)
    finally:
        prepared.close()
    _show(changes, output, f"{file}: {len(changes)} change(s) applied")
    err_console.print(f"applied {file} ({prepared.fleet.digest[:12]}): "
                      + (f"{len(changes)} change(s)" if changes else "nothing to change, in sync"), highlight=False)
