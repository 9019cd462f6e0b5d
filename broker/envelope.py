"""RPC envelopes and the stable error codes.

The correlation id travels in the payload (not only in MQTT 5 properties) so the same envelope
works on MQTT 3.1.1 -- the embedded broker and many devices speak nothing newer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

ENVELOPE_VERSION = 1
MAX_ID_LENGTH = 128


class ErrorCode(str, Enum):
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


@dataclass
class Request:
    id: str
    method: str
    args: dict[str, Any]
    reply_to: str
    deadline: float | None = None
    v: int = ENVELOPE_VERSION

    def to_wire(self) -> dict[str, Any]:
        wire = {"v": self.v, "id": self.id, "method": self.method, "args": self.args,
                "reply_to": self.reply_to}
        if self.deadline is not None:
            wire["deadline"] = self.deadline
        return wire

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.time()) > self.deadline

    @classmethod
    def from_wire(cls, obj: Any, *, method: str, reply_to: str | None = None) -> "Request":
        """Validate a decoded request.  ``method`` comes from the topic, which is authoritative;
        ``reply_to`` may come from the MQTT 5 response-topic property."""
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
        version = obj.get("v", ENVELOPE_VERSION)
        if version != ENVELOPE_VERSION:
            raise EnvelopeError(f"unsupported envelope version {version!r}", request_id, reply_to)
        wire_method = obj.get("method")
        if wire_method is not None and wire_method != method:
            raise EnvelopeError(f"'method' {wire_method!r} does not match the topic's {method!r}",
                                request_id, reply_to)
        args = obj.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise EnvelopeError("'args' must be an object of named arguments", request_id, reply_to)
        deadline = obj.get("deadline")
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))):
            raise EnvelopeError("'deadline' must be a number (unix seconds)", request_id, reply_to)
        unknown = set(obj) - {"v", "id", "method", "args", "reply_to", "deadline"}
        if unknown:
            raise EnvelopeError(f"unknown envelope fields: {sorted(unknown)}", request_id, reply_to)
        return cls(id=request_id, method=method, args=args, reply_to=reply_to,
                   deadline=float(deadline) if deadline is not None else None)


@dataclass
class Reply:
    id: str | None
    ok: bool
    result: Any = None
    error: dict[str, Any] | None = field(default=None)
    v: int = ENVELOPE_VERSION

    @classmethod
    def success(cls, request_id: str, result: Any) -> "Reply":
        return cls(id=request_id, ok=True, result=result)

    @classmethod
    def failure(cls, request_id: str | None, error: RpcError) -> "Reply":
        return cls(id=request_id, ok=False, error=error.to_wire())

    def to_wire(self) -> dict[str, Any]:
        if self.ok:
            return {"v": self.v, "id": self.id, "ok": True, "result": self.result}
        return {"v": self.v, "id": self.id, "ok": False, "error": self.error}

    @classmethod
    def from_wire(cls, obj: Any) -> "Reply":
        if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
            raise EnvelopeError("reply must be an object with a boolean 'ok'")
        reply_id = obj.get("id")
        if reply_id is not None and not isinstance(reply_id, str):
            raise EnvelopeError("reply 'id' must be a string")
        if obj["ok"]:
            return cls(id=reply_id, ok=True, result=obj.get("result"))
        error = obj.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("code"), str):
            raise EnvelopeError("failed reply needs an 'error' object with a 'code'")
        return cls(id=reply_id, ok=False, error=error)

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
