"""The layout holds: one import namespace, and floors that import only those below.

    fedmq.broker (the wire) -> fedmq.ftdl (task processes, bundles, signing)
        -> fedmq.cloud | fedmq.edge (never each other) -> fedmq.cli, fedmq.demo (the top)

and the cloud's domain (lifecycle, selection, history, registry, store, event log) speaks
through its publisher port: it imports neither paho nor the codec.  Read from the source, by
walking every module's imports (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"fedmq.broker": REPO / "broker", "fedmq.ftdl": REPO / "ftdl", "fedmq.cloud": REPO / "cloud",
            "fedmq.edge": REPO / "edge", "fedmq": REPO / "fedmq"}
FLOORS = ["fedmq.broker", "fedmq.ftdl", "fedmq.cloud", "fedmq.edge", "fedmq.cli"]
CLOUD_DOMAIN = ["task_lifecycle", "selection", "run_history", "task_servers", "task_views", "devices", "events",
                "bundle_store", "errors", "ports", "db"]


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            if "node_modules" in path.parts:
                continue
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports_of(path: Path, module: str) -> set[str]:
    names: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else \
                    module.split(".")[: len(module.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module or ""]).rstrip("."))
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def floor(name: str) -> str | None:
    for candidate in FLOORS:
        if name == candidate or name.startswith(candidate + "."):
            return candidate
    if name == "fedmq.demo" or name.startswith(("fedmq.demo.", "fedmq.plots", "fedmq.node_red")):
        return "fedmq.cli"  # the top floor: the command and what only it uses
    return None


GRAPH = {module: imports_of(path, module) for module, path in modules().items()}


def test_every_internal_import_goes_through_the_fedmq_namespace() -> None:
    stray = {module: sorted(n for n in names if n.split(".")[0] in ("broker", "cloud", "edge", "ftdl"))
             for module, names in GRAPH.items()}
    assert {m: n for m, n in stray.items() if n} == {}


def test_each_floor_imports_only_the_floors_below_it() -> None:
    allowed = {"fedmq.broker": {"fedmq.broker"},
               "fedmq.ftdl": {"fedmq.broker", "fedmq.ftdl"},
               "fedmq.cloud": {"fedmq.broker", "fedmq.ftdl", "fedmq.cloud"},
               "fedmq.edge": {"fedmq.broker", "fedmq.ftdl", "fedmq.edge"},
               "fedmq.cli": set(FLOORS)}
    wrong = {}
    for module, names in GRAPH.items():
        own = floor(module)
        if own is None:
            continue
        reached = {f for f in (floor(n) for n in names) if f is not None}
        if reached - allowed[own]:
            wrong[module] = sorted(reached - allowed[own])
    assert wrong == {}
    assert len(GRAPH) > 60  # the walk saw the code


def test_the_cloud_domain_speaks_through_its_port() -> None:
    leaks = {name: sorted(n for n in GRAPH[f"fedmq.cloud.{name}"]
                          if n.startswith(("paho", "fedmq.broker.codec", "fedmq.broker.connection")))
             for name in CLOUD_DOMAIN}
    assert {k: v for k, v in leaks.items() if v} == {}
