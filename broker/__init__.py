"""fedmq's messaging layer: connections, codec, topics, RPC, and the embedded broker."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmq.broker.codec import Codec, CodecError, decode, encode
    from fedmq.broker.connection import BrokerSettings, BrokerUnavailable, MqttConnection, Will
    from fedmq.broker.envelope import ErrorCode, RpcError
    from fedmq.broker.rpc_client import RpcClient
    from fedmq.broker.rpc_server import CallContext, RpcServer, rpc
    from fedmq.broker.topics import Topics

# Loaded when asked for: importing one module of the package (the edge agent's topics, codec,
# connection) must not load the RPC server and every schema with it.
_HOMES = {"Codec": "codec", "CodecError": "codec", "decode": "codec", "encode": "codec",
          "BrokerSettings": "connection", "BrokerUnavailable": "connection", "MqttConnection": "connection",
          "Will": "connection", "ErrorCode": "envelope", "RpcError": "envelope", "RpcClient": "rpc_client",
          "CallContext": "rpc_server", "RpcServer": "rpc_server", "rpc": "rpc_server", "Topics": "topics"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'fedmq.broker' has no attribute {name!r}")
    from importlib import import_module
    return getattr(import_module(f"fedmq.broker.{_HOMES[name]}"), name)


__all__ = [
           "BrokerSettings",
           "BrokerUnavailable",
           "CallContext",
           "Codec",
           "CodecError",
           "ErrorCode",
           "MqttConnection",
           "RpcClient",
           "RpcError",
           "RpcServer",
           "Topics",
           "Will",
           "decode",
           "encode",
           "rpc",
]
