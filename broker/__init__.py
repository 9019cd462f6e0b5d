"""fedmq's messaging layer: connections, codec, topics, RPC, and the embedded broker."""

from fedmq.broker.codec import Codec, CodecError, decode, encode
from fedmq.broker.connection import BrokerSettings, BrokerUnavailable, MqttConnection, Will
from fedmq.broker.envelope import ErrorCode, RpcError
from fedmq.broker.rpc_client import RpcClient
from fedmq.broker.rpc_server import CallContext, RpcServer, rpc
from fedmq.broker.topics import Topics

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
