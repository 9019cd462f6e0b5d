"""RPC envelopes and the stable error codes.

The correlation id travels in the payload (not only in MQTT 5 properties) so the same envelope
works on MQTT 3.1.1 -- the embedded broker and many devices speak nothing newer.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, field

from fedmq.broker.wire import Wire, field_of, problem

ENVELOPE_VERSION = 1
MAX_ID_LENGTH = 128


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_METHOD = "unknown_method"
    INVALID_ARGS = "invalid_args"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    FORBIDDEN = "forbidden"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class RpcError(Exception):
    """An error with a stable code; raised by handlers, carried in replies, raised by callers."""

    def __init__(self, code: ErrorCode | str, message: str, details: Any = None) -> None:
        super().__init__(f"{ErrorCode(code).value}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.details is not None:
            wire["details"] = self.details
        return wire


class EnvelopeError(ValueError):
    """A request that cannot be processed; carries what is known so an error can be sent."""

    def __init__(self, message: str, request_id: str | None = None,
                 reply_to: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.reply_to = reply_to


_REQUEST_FIELDS = ("v", "id", "method", "args", "reply_to", "deadline")


class Request(Wire, forbid_unknown_fields=True, kw_only=True):
    """A request envelope: ``{v, id, method?, args, reply_to, deadline?}``."""

    id: Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    method: str
    args: dict[str, Any] = field(default_factory=dict)
    reply_to: str
    deadline: float | None = None
    v: Literal[1] = 1

    def to_wire(self) -> dict[str, Any]:
        wire = super().to_wire()
        if self.deadline is None:
            del wire["deadline"]
        return wire

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.time()) > self.deadline

    @classmethod
    def from_wire(cls, obj: Any, *, method: str, reply_to: str | None = None) -> Request:
        """Validate a decoded request.  ``method`` comes from the topic, which is authoritative;
        ``reply_to`` may come from the MQTT 5 response-topic property.  An ``EnvelopeError``
        carries the id and reply topic when they could be read, so the caller still gets an
        answer."""
        if not isinstance(obj, dict):
            raise EnvelopeError(f"request must be an object, got {type(obj).__name__}")
        raw_id = obj.get("id")
        request_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID_LENGTH else None
        wire_reply = obj.get("reply_to")
        if wire_reply is not None and not isinstance(wire_reply, str):
            raise EnvelopeError("'reply_to' must be a string", request_id, reply_to)
        reply_to = wire_reply or reply_to
        if not reply_to:
            raise EnvelopeError("missing 'reply_to'", request_id, None)
        if request_id is None:
            what = "missing 'id'" if raw_id is None else \
                f"'id' must be a string of 1-{MAX_ID_LENGTH} characters"
            raise EnvelopeError(what, None, reply_to)
        unknown = set(obj) - set(_REQUEST_FIELDS)
        if unknown:
            raise EnvelopeError(f"unknown envelope fields: {sorted(unknown)}", request_id, reply_to)
        if obj.get("method") is not None and obj["method"] != method:
            raise EnvelopeError(f"'method' {obj['method']!r} does not match the topic's {method!r}",
                                request_id, reply_to)
        body = {**obj, "method": method, "reply_to": reply_to}
        if body.get("args") is None:
            body["args"] = {}
        try:
            return msgspec.convert(body, cls)
        except msgspec.ValidationError as exc:
            raise EnvelopeError(_envelope_problem(exc, body), request_id, reply_to) from None


def _envelope_problem(exc: msgspec.ValidationError, body: dict[str, Any]) -> str:
    name = field_of(exc) or "request"
    if name == "args":
        return "'args' must be an object of named arguments"
    if name == "v":
        return f"unsupported envelope version {body.get('v')!r}"
    if name == "deadline":
        return "'deadline' must be a number (unix seconds)"
    return f"'{name}': {problem(exc).removeprefix(name + ' ')}"


class Reply(Wire, kw_only=True):
    """A reply envelope: ``{v, id, ok: true, result}`` or ``{v, id, ok: false, error}``."""

    id: str | None
    ok: bool
    result: Any = None
    error: dict[str, Any] | None = None
    v: int = ENVELOPE_VERSION

    @classmethod
    def success(cls, request_id: str, result: Any) -> Reply:
        return cls(id=request_id, ok=True, result=result)

    @classmethod
    def failure(cls, request_id: str | None, error: RpcError) -> Reply:
        return cls(id=request_id, ok=False, error=error.to_wire())

    def to_wire(self) -> dict[str, Any]:
        if self.ok:
            return {"v": self.v, "id": self.id, "ok": True, "result": self.result}
        return {"v": self.v, "id": self.id, "ok": False, "error": self.error}

    @classmethod
    def from_wire(cls, obj: Any) -> Reply:
        if not isinstance(obj, dict):
            raise EnvelopeError("reply must be an object with a boolean 'ok'")
        try:
            reply = msgspec.convert({"id": obj.get("id"), **{k: v for k, v in obj.items() if k != "id"}}, cls)
        except msgspec.ValidationError as exc:
            raise EnvelopeError(f"malformed reply: {problem(exc)}") from None
        if not reply.ok and (reply.error is None or not isinstance(reply.error.get("code"), str)):
            raise EnvelopeError("failed reply needs an 'error' object with a 'code'")
        return reply

    def raise_for_error(self) -> Any:
        if self.ok:
            return self.result
        assert self.error is not None
        code = self.error.get("code", "internal")
        try:
            code = ErrorCode(code)
        except ValueError:
            code = ErrorCode.INTERNAL
        raise RpcError(code, str(self.error.get("message", "")), self.error.get("details"))
