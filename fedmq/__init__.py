"""fedmq: federated-learning task management for device fleets, over MQTT.

One namespace, in floors that each import only those below: ``fedmq.broker`` (the wire) ->
``fedmq.ftdl`` (task processes, bundles, signing) -> ``fedmq.cloud`` | ``fedmq.edge`` (never
each other) -> ``fedmq.cli`` (and the demo).  See docs/architecture.md.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedmq")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
