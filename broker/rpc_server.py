"""RPC services over MQTT.

A service is a plain class with a ``name`` and methods marked ``@rpc``; each method's type hints
are its argument schema (checked strictly by pydantic: no coercion of ``"1"`` into ``1``, no
unknown arguments), and ``@rpc(roles=...)`` is where the roles a method admits are declared.
``RpcServer.add(instance)`` serves it on ``<prefix>/rpc/<name>/+/+``, answering on the request's
``reply_to``, in the request's codec, with stable error codes -- every service also answers
``ping`` and ``describe``.  Handlers raise the domain's own errors (``fedmq.broker.errors``);
``ERROR_CODES`` below is the one place that turns them into codes.  Nothing a caller sends can
stop the server: every failure becomes an error reply or, where no reply topic is known, a
logged drop.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, get_type_hints

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from fedmq import __version__  # the package root: the version, nothing else
from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection
from fedmq.broker.envelope import EnvelopeError, ErrorCode, Reply, Request, RpcError
from fedmq.broker.errors import Conflict, FedmqError, Forbidden, Invalid, NotFound
from fedmq.broker.reply_cache import ReplyCache, Seen, digest_of
from fedmq.broker.roles import Role
from fedmq.broker.topics import TopicError, Topics, check_id

log = logging.getLogger("fedmq.broker.rpc")

DEFAULT_MAX_PAYLOAD = 256 * 1024
DEFAULT_MAX_REPLY = 512 * 1024
PEOPLE_WORKERS = 2
FLEET_ROLES = frozenset({Role.DEVICE})  # half the shipped mosquitto.conf's max_packet_size

# The one map from what the domain says went wrong to the code a caller sees.
ERROR_CODES: dict[type[FedmqError], ErrorCode] = {
    NotFound: ErrorCode.NOT_FOUND,
    Conflict: ErrorCode.CONFLICT,
    Invalid: ErrorCode.INVALID_ARGS,
    Forbidden: ErrorCode.FORBIDDEN,
}


def error_code(exc: FedmqError) -> ErrorCode:
    for kind in type(exc).__mro__:
        if kind in ERROR_CODES:
            return ERROR_CODES[kind]
    return ErrorCode.INTERNAL


@dataclass(frozen=True)
class CallContext:
    """Who is calling; a handler gets it by declaring a parameter annotated ``CallContext``."""

    service: str
    method: str
    caller: str
    request_id: str
    codec: codec.Codec
    role: Role | None = None  # None: roles are not checked (an open development broker)


@dataclass(frozen=True)
class RpcDeclaration:
    """What ``@rpc`` records on a method: its wire name and the roles it admits (``None``: not
    declared yet, admitted to every caller)."""

    name: str | None
    roles: frozenset[str] | None


F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__fedmq_rpc__"


def rpc(fn: F | None = None, *, name: str | None = None, roles: frozenset[str] | set[str] | None = None) -> Any:
    """Mark a method of a service class as callable over RPC (``@rpc`` or ``@rpc(name=...)``)."""
    def mark(method: F) -> F:
        setattr(method, _MARK, RpcDeclaration(name, frozenset(roles) if roles is not None else None))
        return method
    return mark(fn) if fn is not None else mark


@dataclass
class MethodSpec:
    name: str
    handler: Callable[..., Any]
    args_model: type[BaseModel]
    context_param: str | None
    doc: str
    roles: frozenset[str] | None = None


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


class ServedService:
    """A service instance as the server holds it: its methods, plus ``ping`` and ``describe``."""

    def __init__(self, instance: Any) -> None:
        self.instance = instance
        self.name = check_id(getattr(instance, "name", None), "service")
        self.version = str(getattr(instance, "version", __version__))
        self.started_at = time.time()
        self.methods: dict[str, MethodSpec] = {}
        for attr in dir(type(instance)):
            declaration = getattr(getattr(type(instance), attr, None), _MARK, None)
            if isinstance(declaration, RpcDeclaration):
                self._register(getattr(instance, attr), declaration.name or attr, declaration.roles)
        self._register(self.ping, "ping", None)
        self._register(self.describe, "describe", None)

    def _register(self, handler: Callable[..., Any], name: str, roles: frozenset[str] | None) -> None:
        method_name = check_id(name, "method")
        model, context_param = _args_model(method_name, handler)
        self.methods[method_name] = MethodSpec(method_name, handler, model, context_param,
                                               inspect.getdoc(handler) or "", roles)

    def ping(self) -> dict[str, Any]:
        """Liveness: answers with the service's version and uptime."""
        return {"service": self.name, "version": self.version, "pong": True,
                "uptime_s": round(time.time() - self.started_at, 3),
                "host": socket.gethostname(), "pid": os.getpid()}

    def describe(self) -> dict[str, Any]:
        """The service's methods with their argument schemas (JSON Schema) and roles."""
        return {"service": self.name, "version": self.version, "methods": {
            spec.name: {"doc": spec.doc, "args": spec.args_model.model_json_schema(),
                        "roles": sorted(spec.roles) if spec.roles is not None else None}
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
    """Serves one or more service instances on one connection."""

    def __init__(self, connection: MqttConnection, topics: Topics | None = None, *,
                 max_payload: int = DEFAULT_MAX_PAYLOAD, workers: int = 8,
                 shared_group: str | None = None, roles: Callable[[str], Role] | None = None,
                 max_reply: int = DEFAULT_MAX_REPLY) -> None:
        """``roles`` tells the role of a caller (the caller level of the topic, which the broker
        binds to the connection's credentials); without it no method's roles are checked, as for
        a service on an open development broker.  ``max_reply`` stays below the broker's packet
        limit: a bigger answer is never published (the broker would disconnect us for it, and
        paho would resend it after every reconnect), the caller gets an error instead."""
        self.connection = connection
        self.topics = topics or Topics()
        self.max_payload = max_payload
        self.shared_group = check_id(shared_group, "shared group") if shared_group else None
        self.services: dict[str, ServedService] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc")
        # People and services never queue behind a fleet: when 10,000 devices ask at once, an
        # operator's devices.list took 17 s in the same FIFO.  Devices (and callers of unknown
        # role) use the main pool; everyone else this one.
        self._people = ThreadPoolExecutor(max_workers=PEOPLE_WORKERS, thread_name_prefix="rpc-people")
        self.replies = ReplyCache()
        self.roles = roles
        self.max_reply = max_reply
        self.stats = {"requests": 0, "errors": 0, "dropped": 0, "duplicates": 0, "denied": 0, "oversized": 0}

    def add(self, instance: Any) -> Any:
        """Serve an instance of a service class (a ``name`` and ``@rpc`` methods).  A server that
        checks roles refuses a service with a method that declares none."""
        served = ServedService(instance)
        if self.roles is not None:
            undeclared = [m for m, spec in served.methods.items()
                          if spec.roles is None and m not in ("ping", "describe")]
            if undeclared:
                raise TypeError(f"{served.name}: methods {undeclared} declare no roles (@rpc(roles=...))")
        self.services[served.name] = served
        return instance

    def _filter(self, service: str) -> str:
        topic_filter = self.topics.rpc_filter(service)
        if self.shared_group:  # replicas share the load (MQTT 5 / Mosquitto >= 1.6 on 3.1.1)
            topic_filter = f"$share/{self.shared_group}/{topic_filter}"
        return topic_filter

    def start(self, wait: bool = True) -> RpcServer:
        """Subscribe the services' topics.  ``wait=False`` before the connection is up: a
        persistent session's queued requests then find their handler the moment they arrive."""
        for name in self.services:
            self.connection.subscribe(self._filter(name), self._on_message, qos=1, wait=wait)
        return self

    def stop(self) -> None:
        for name in self.services:
            self.connection.unsubscribe(self._filter(name))
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._people.shutdown(wait=True, cancel_futures=True)

    # --- request path ----------------------------------------------------------------------
    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        # paho's network thread: parse cheaply, then hand the handler to the pool.
        try:
            # An invalid method name is answered (unknown_method, with the list) below.
            rpc_topic = self.topics.parse_rpc(message.topic, check_method=False)
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
        try:
            codec.check_tree(request.args, "args")
        except codec.CodecError as exc:
            self._send(request.reply_to, Reply.failure(request.id, RpcError(ErrorCode.BAD_REQUEST, str(exc))),
                       request_codec, correlation)
            return
        if request.expired():
            self._drop(message.topic, f"request {request.id} from {rpc_topic.caller} expired before it was served")
            return
        key = (rpc_topic.caller, rpc_topic.method, request.id)
        # What the request asks, not its bytes: a retry under the same id carries a new deadline.
        seen, answer = self.replies.begin(key, digest_of(codec.encode(
            {"args": request.args, "reply_to": request.reply_to}, codec.Codec.MSGPACK)))
        if seen is not Seen.NEW:
            self.stats["duplicates"] += 1
            if seen is Seen.ANSWERED and answer is not None:  # a QoS 1 redelivery: answer again
                self.connection.publish(answer.reply_to, answer.payload, qos=1,
                                        properties=self._reply_props(correlation))
            elif seen is Seen.CONFLICT:
                self._send(request.reply_to, Reply.failure(request.id, RpcError(
                    ErrorCode.CONFLICT, f"request id {request.id!r} was already used by {rpc_topic.caller} "
                    f"for a different {rpc_topic.method} request; use a new id per request")),
                    request_codec, correlation)
            return
        role = self.roles(rpc_topic.caller) if self.roles is not None else None
        context = CallContext(rpc_topic.service, rpc_topic.method, rpc_topic.caller, request.id, request_codec, role)
        pool = self._people if role is not None and role not in FLEET_ROLES else self._pool
        pool.submit(self._serve, context, request, correlation)

    def _serve(self, context: CallContext, request: Request, correlation: bytes | None) -> None:
        self.stats["requests"] += 1
        reply = self._dispatch(context, request)
        payload = self._send(request.reply_to, reply, context.codec, correlation)
        self.replies.finish((context.caller, context.method, request.id), request.reply_to, payload)

    def _dispatch(self, context: CallContext, request: Request) -> Reply:
        service = self.services.get(context.service)
        if service is None:
            return Reply.failure(request.id, RpcError(ErrorCode.UNKNOWN_METHOD, f"no service {context.service!r} here"))
        spec = service.methods.get(context.method)
        if spec is None:
            return Reply.failure(request.id, RpcError(
                ErrorCode.UNKNOWN_METHOD, f"{context.service} has no method {context.method!r}",
                {"methods": sorted(service.methods)}))
        if spec.roles is not None and self.roles is not None and context.role not in spec.roles:
            self.stats["denied"] += 1
            return Reply.failure(request.id, RpcError(ErrorCode.FORBIDDEN, (
                f"{context.caller} (role {context.role}) may not call {context.service}.{context.method}; "
                f"it needs the role {' or '.join(sorted(spec.roles))}")))
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
        except FedmqError as exc:
            self.stats["errors"] += 1
            return Reply.failure(request.id, RpcError(error_code(exc), exc.message, exc.details))
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
        if len(payload) > self.max_reply:
            self.stats["oversized"] += 1
            log.error("reply %s of %d bytes exceeds the limit of %d bytes; answered with an error instead",
                      reply.id, len(payload), self.max_reply)
            payload = codec.encode(Reply.failure(reply.id, RpcError(
                ErrorCode.INTERNAL, f"the answer of {len(payload)} bytes exceeds the reply limit of "
                f"{self.max_reply} bytes; ask for less (a smaller limit, or page with the cursor)")).to_wire(),
                reply_codec)
        self.connection.publish(topic, payload, qos=1, properties=self._reply_props(correlation))
        return payload

    def _drop(self, topic: str, reason: str) -> None:
        self.stats["dropped"] += 1
        log.warning("dropped request on %s: %s", topic, reason)
