"""fedmq: federated-learning task management for device fleets, over MQTT.

One namespace, in floors that each import only those below: ``fedmq.broker`` (the wire) ->
``fedmq.ftdl`` (task processes, bundles, signing) -> ``fedmq.cloud`` | ``fedmq.edge`` (never
each other) -> ``fedmq.cli`` (and the demo).  See docs/architecture.md.
"""

from __future__ import annotations


def __getattr__(name: str) -> str:
    """``__version__`` is read from the installed metadata when asked for, not at import:
    ``importlib.metadata`` costs every process that imports fedmq (an idle edge agent among them)
    about 1 MB and 40 ms, and only ``--version`` wants it."""
    if name != "__version__":
        raise AttributeError(f"module 'fedmq' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("fedmq")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0+unknown"
    globals()["__version__"] = found  # read once: later lookups find the attribute itself
    return found
