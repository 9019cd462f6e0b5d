"""The one schema layer of what travels on topics: msgspec Structs, and the one way to read one.

Why msgspec and not pydantic for these: they are what every device decodes while it sits idle
(envelopes, presence, events, announcements, offers, commands, retained records).  Importing
pydantic and building its models cost an idle agent ~10 MB of its ~36 MB; msgspec costs ~1.4 MB.
Pydantic stays where its signature-driven validation earns its weight, in processes that are not
idle devices: the cloud's RPC arguments (``fedmq.broker.arguments``) and the files people write.

Receivers ignore fields they do not know (a newer cloud may add some), senders build the Structs
with the types the fields declare.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

T = TypeVar("T")


class RecordError(ValueError):
    """A wire record that is not one (receivers log it and keep what they had)."""


def builtins(record: msgspec.Struct) -> dict[str, Any]:
    """A record as plain builtins for ``fedmq.broker.codec`` (enums as their values; bytes stay
    bytes -- msgpack carries them, and the codec's JSON says how it writes them)."""
    built: dict[str, Any] = msgspec.to_builtins(record, builtin_types=(bytes, bytearray, memoryview))
    return built


# mypy reads a Struct's options (kw_only, frozen) per class, so every subclass repeats them;
# msgspec itself would inherit them.
class Wire(msgspec.Struct, kw_only=True):
    """Base of the wire records: keyword-only, unknown fields ignored on reading."""

    def to_wire(self) -> dict[str, Any]:
        return builtins(self)


class FrozenWire(msgspec.Struct, frozen=True, kw_only=True):
    """A record that never changes once built (retained records, manifests): hashable."""

    def to_wire(self) -> dict[str, Any]:
        return builtins(self)


def read(kind: type[T], body: Any) -> T:
    """``body`` (decoded builtins) as a ``kind``; raises ``RecordError`` that says where and what."""
    try:
        return msgspec.convert(body, kind)
    except msgspec.ValidationError as exc:
        raise RecordError(f"invalid {kind.__name__}: {problem(exc)}") from None


def problem(exc: msgspec.ValidationError) -> str:
    """msgspec's ``Expected `int >= 0`, got `-1` - at `$.session``` as ``session expected ...``."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `")
    if not sep:
        return text
    path = where.rstrip("`").removeprefix("$").lstrip(".")
    message = message[:1].lower() + message[1:]
    return f"{path} {message}" if path else message


def field_of(exc: msgspec.ValidationError) -> str:
    """The top-level field a msgspec error is about ('' when it is about the whole)."""
    _, sep, where = str(exc).rpartition(" - at `$.")
    if not sep:
        return ""
    path = where.rstrip("`")
    for stop in (".", "["):
        path = path.split(stop, 1)[0]
    return path
