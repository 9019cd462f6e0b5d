"""fedmq's messaging layer: connections, codec, topics, RPC, and the embedded broker."""

from broker.codec import Codec, CodecError, decode, encode
from broker.connection import BrokerSettings, BrokerUnavailable, MqttConnection, Will
from broker.envelope import ErrorCode, RpcError
from broker.rpc_client import RpcClient
from broker.rpc_server import CallContext, RpcServer, Service
from broker.topics import Topics

__all__ = ["BrokerSettings", "BrokerUnavailable", "CallContext", "Codec", "CodecError",
           "ErrorCode", "MqttConnection", "RpcClient", "RpcError", "RpcServer", "Service",
           "Topics", "Will", "decode", "encode"]
