"""fedmq: federated-learning task management for device fleets, over MQTT."""

__version__ = "0.1.0"
