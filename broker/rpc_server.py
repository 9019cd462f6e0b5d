"""RPC services over MQTT.

A ``Service`` declares methods with a decorator; each method's type hints are its argument
schema (checked strictly by pydantic: no coercion of ``"1"`` into ``1``, no unknown arguments).
``RpcServer`` subscribes ``<prefix>/rpc/<service>/+/+`` for each service and answers on the
request's ``reply_to``, in the request's codec, with stable error codes.  Nothing a caller sends
can stop it: every failure becomes an error reply or, where no reply topic is known, a logged
drop.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, get_type_hints

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from broker import codec
from broker.connection import MqttConnection
from broker.envelope import EnvelopeError, ErrorCode, Reply, Request, RpcError
from broker.topics import Topics, TopicError, check_id
from fedmq import __version__

log = logging.getLogger("fedmq.broker.rpc")

DEFAULT_MAX_PAYLOAD = 256 * 1024
_DEDUP_SIZE = 2048


@dataclass(frozen=True)
class CallContext:
    """Who is calling; a handler gets it by declaring a parameter annotated ``CallContext``."""

    service: str
    method: str
    caller: str
    request_id: str
    codec: codec.Codec


@dataclass
class MethodSpec:
    name: str
    handler: Callable[..., Any]
    args_model: type[BaseModel]
    context_param: str | None
    doc: str


def _args_model(name: str, handler: Callable[..., Any]) -> tuple[type[BaseModel], str | None]:
    hints = get_type_hints(handler, include_extras=True)
    fields: dict[str, Any] = {}
    context_param = None
    for param in inspect.signature(handler).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"RPC method {name}: *args/**kwargs cannot be validated; name each argument")
        annotation = hints.get(param.name, Any)
        if annotation is CallContext:
            context_param = param.name
            continue
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    model = create_model(f"{name}_args", __config__=ConfigDict(strict=True, extra="forbid"), **fields)
    return model, context_param


class Service:
    """A named set of RPC methods.  Every service answers ``ping`` and ``describe``."""

    def __init__(self, name: str, version: str = __version__) -> None:
        self.name = check_id(name, "service")
        self.version = version
        self.started_at = time.time()
        self.methods: dict[str, MethodSpec] = {}
        self.method(self.ping)
        self.method(self.describe)

    def method(self, handler: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
        """Register ``handler`` (usable as ``@service.method`` or ``@service.method(name=...)``)."""
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            method_name = check_id(name or fn.__name__, "method")
            model, context_param = _args_model(method_name, fn)
            self.methods[method_name] = MethodSpec(method_name, fn, model, context_param,
                                                   inspect.getdoc(fn) or "")
            return fn
        return register(handler) if handler is not None else register

    def ping(self) -> dict[str, Any]:
        """Liveness: answers with the service's version and uptime."""
        return {"service": self.name, "version": self.version, "pong": True,
                "uptime_s": round(time.time() - self.started_at, 3),
                "host": socket.gethostname(), "pid": os.getpid()}

    def describe(self) -> dict[str, Any]:
        """The service's methods with their argument schemas (JSON Schema)."""
        return {"service": self.name, "version": self.version, "methods": {
            spec.name: {"doc": spec.doc, "args": spec.args_model.model_json_schema()}
            for spec in self.methods.values()}}


def _validation_message(exc: ValidationError) -> tuple[str, list[dict[str, Any]]]:
    details = [{"loc": ".".join(str(p) for p in err["loc"]) or "args", "msg": err["msg"]}
               for err in exc.errors(include_url=False)]
    return "; ".join(f"{d['loc']}: {d['msg']}" for d in details), details


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


class RpcServer:
    """Serves one or more ``Service`` objects on one connection."""

    def __init__(self, connection: MqttConnection, topics: Topics | None = None, *,
                 max_payload: int = DEFAULT_MAX_PAYLOAD, workers: int = 8,
                 shared_group: str | None = None) -> None:
        self.connection = connection
        self.topics = topics or Topics()
        self.max_payload = max_payload
        self.shared_group = check_id(shared_group, "shared group") if shared_group else None
        self.services: dict[str, Service] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc")
        self._done: OrderedDict[tuple[str, str], tuple[str, bytes]] = OrderedDict()
        self._running: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "errors": 0, "dropped": 0, "duplicates": 0}

    def add(self, service: Service) -> Service:
        self.services[service.name] = service
        return service

    def start(self) -> "RpcServer":
        for service in self.services.values():
            topic_filter = self.topics.rpc_filter(service.name)
            if self.shared_group:  # replicas share the load (MQTT 5 / Mosquitto >= 1.6 on 3.1.1)
                topic_filter = f"$share/{self.shared_group}/{topic_filter}"
            self.connection.subscribe(topic_filter, self._on_message, qos=1)
        return self

    def stop(self) -> None:
        for service in self.services.values():
            self.connection.unsubscribe(self.topics.rpc_filter(service.name))
        self._pool.shutdown(wait=True, cancel_futures=True)

    # --- request path ----------------------------------------------------------------------
    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        # paho's network thread: parse cheaply, then hand the handler to the pool.
        try:
            rpc_topic = self.topics.parse_rpc(message.topic)
        except TopicError as exc:
            self._drop(message.topic, str(exc))
            return
        props = getattr(message, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        try:
            body, request_codec = codec.decode(message.payload)
        except codec.CodecError as exc:
            if response_topic and self.topics.reply_allowed(response_topic, rpc_topic.caller):
                self._send(response_topic, Reply.failure(None, RpcError(ErrorCode.BAD_REQUEST, str(exc))),
                           codec.Codec.JSON, correlation)
            else:
                self._drop(message.topic, f"undecodable payload of {len(message.payload)} bytes ({exc})")
            return
        try:
            request = Request.from_wire(body, method=rpc_topic.method, reply_to=response_topic)
        except EnvelopeError as exc:
            if exc.reply_to and self.topics.reply_allowed(exc.reply_to, rpc_topic.caller):
                self._send(exc.reply_to, Reply.failure(exc.request_id, RpcError(ErrorCode.BAD_REQUEST, str(exc))),
                           request_codec, correlation)
            else:
                self._drop(message.topic, f"bad envelope from {rpc_topic.caller}: {exc}")
            return
        if not self.topics.reply_allowed(request.reply_to, rpc_topic.caller):
            # Answering elsewhere would let a caller make the service publish on others' topics.
            self._drop(message.topic, f"reply_to {request.reply_to!r} is outside "
                                      f"{self.topics.reply_base(rpc_topic.caller)}/")
            return
        if len(message.payload) > self.max_payload:
            self._send(request.reply_to, Reply.failure(request.id, RpcError(
                ErrorCode.BAD_REQUEST,
                f"request of {len(message.payload)} bytes exceeds the limit of {self.max_payload}")),
                request_codec, correlation)
            return
        if request.expired():
            self._drop(message.topic, f"request {request.id} from {rpc_topic.caller} expired before it was served")
            return
        key = (rpc_topic.caller, request.id)
        with self._lock:
            if key in self._running:
                self.stats["duplicates"] += 1
                return
            cached = self._done.get(key)
            if cached is None:
                self._running.add(key)
        if cached is not None:  # a QoS 1 redelivery: answer again, do not run the handler twice
            self.stats["duplicates"] += 1
            self.connection.publish(cached[0], cached[1], qos=1, properties=self._reply_props(correlation))
            return
        context = CallContext(rpc_topic.service, rpc_topic.method, rpc_topic.caller, request.id, request_codec)
        self._pool.submit(self._serve, context, request, correlation)

    def _serve(self, context: CallContext, request: Request, correlation: bytes | None) -> None:
        self.stats["requests"] += 1
        reply = self._dispatch(context, request)
        payload = self._send(request.reply_to, reply, context.codec, correlation)
        with self._lock:
            self._running.discard((context.caller, request.id))
            if payload is not None:
                self._done[(context.caller, request.id)] = (request.reply_to, payload)
                while len(self._done) > _DEDUP_SIZE:
                    self._done.popitem(last=False)

    def _dispatch(self, context: CallContext, request: Request) -> Reply:
        service = self.services.get(context.service)
        if service is None:
            return Reply.failure(request.id, RpcError(ErrorCode.UNKNOWN_METHOD, f"no service {context.service!r} here"))
        spec = service.methods.get(context.method)
        if spec is None:
            return Reply.failure(request.id, RpcError(
                ErrorCode.UNKNOWN_METHOD, f"{context.service} has no method {context.method!r}",
                {"methods": sorted(service.methods)}))
        try:
            args = spec.args_model.model_validate(request.args)
        except ValidationError as exc:
            message, details = _validation_message(exc)
            return Reply.failure(request.id, RpcError(ErrorCode.INVALID_ARGS, message, details))
        kwargs = {name: getattr(args, name) for name in spec.args_model.model_fields}
        if spec.context_param:
            kwargs[spec.context_param] = context
        try:
            return Reply.success(request.id, _to_wire(spec.handler(**kwargs)))
        except RpcError as exc:
            self.stats["errors"] += 1
            return Reply.failure(request.id, exc)
        except Exception:
            # The trace stays in this process's log; the caller gets a reference to quote.
            ref = uuid.uuid4().hex[:8]
            self.stats["errors"] += 1
            log.exception("%s.%s failed (ref %s)", context.service, context.method, ref)
            return Reply.failure(request.id, RpcError(ErrorCode.INTERNAL, f"internal error (ref {ref})"))

    # --- reply path ------------------------------------------------------------------------
    def _reply_props(self, correlation: bytes | None) -> Properties | None:
        if correlation is None or not self.connection.is_v5:
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = correlation
        return props

    def _send(self, topic: str, reply: Reply, reply_codec: codec.Codec,
              correlation: bytes | None) -> bytes | None:
        try:
            payload = codec.encode(reply.to_wire(), reply_codec)
        except codec.CodecError as exc:
            log.error("reply %s could not be encoded: %s", reply.id, exc)
            payload = codec.encode(Reply.failure(reply.id, RpcError(
                ErrorCode.INTERNAL, "the result could not be encoded")).to_wire(), reply_codec)
        self.connection.publish(topic, payload, qos=1, properties=self._reply_props(correlation))
        return payload

    def _drop(self, topic: str, reason: str) -> None:
        self.stats["dropped"] += 1
        log.warning("dropped request on %s: %s", topic, reason)
