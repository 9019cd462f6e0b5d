"""The one codec of fedmq: msgpack for devices, JSON for people and Node-RED.

Every payload is self-describing: a JSON document starts with ``{`` or ``[`` (after optional
white space), which in msgpack would be a lone positive fixint followed by trailing bytes --
never a valid fedmq message.  So a receiver detects the codec per message and answers in the
same one, which is what lets ``mosquitto_pub -m '{...}'`` talk to any endpoint.
"""

from __future__ import annotations

import base64
import json
import math
from enum import Enum, StrEnum
from typing import Any

import msgpack


class Codec(StrEnum):
    MSGPACK = "msgpack"
    JSON = "json"


class CodecError(ValueError):
    """The payload is neither valid msgpack nor valid JSON (or cannot be encoded)."""


_JSON_LEADS = frozenset(b"{[")
_WHITESPACE = b" \t\r\n"


def detect(payload: bytes) -> Codec:
    """JSON when the first non-blank byte opens an object or array, msgpack otherwise."""
    stripped = payload.lstrip(_WHITESPACE)
    if stripped.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM some editors add
        stripped = stripped[3:].lstrip(_WHITESPACE)
    if stripped and stripped[0] in _JSON_LEADS:
        return Codec.JSON
    return Codec.MSGPACK


def _json_default(value: Any) -> Any:
    # JSON has no bytes: ship them as base64 text so a JSON caller still gets an answer.
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _msgpack_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"cannot encode {type(value).__name__} as msgpack")


def encode(value: Any, codec: Codec | str = Codec.MSGPACK) -> bytes:
    codec = Codec(codec)
    try:
        if codec is Codec.JSON:
            return json.dumps(value, default=_json_default, separators=(",", ":"),
                              allow_nan=False).encode("utf-8")
        return msgpack.packb(value, default=_msgpack_default, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(f"cannot encode as {codec.value}: {exc}") from exc


def decode(payload: bytes | bytearray | memoryview, codec: Codec | None = None) -> tuple[Any, Codec]:
    """Decode one payload; returns the value and the codec it was written in."""
    data = bytes(payload)
    codec = codec or detect(data)
    try:
        if codec is Codec.JSON:
            return json.loads(data.decode("utf-8")), codec
        # strict_map_key: only str/bytes keys, so a hostile map cannot smuggle odd key types.
        return msgpack.unpackb(data, raw=False, strict_map_key=True), codec
    except RecursionError:
        raise CodecError(f"payload is nested too deeply to be {codec.value}") from None
    except (ValueError, TypeError, UnicodeDecodeError, msgpack.ExtraData,
            msgpack.FormatError, msgpack.StackError) as exc:
        raise CodecError(f"payload is not valid {codec.value}: {exc}") from exc


MAX_DEPTH = 32


def check_tree(value: Any, what: str = "value", max_depth: int = MAX_DEPTH) -> None:
    """Refuse what either codec can carry but fedmq must not store or forward: numbers JSON
    cannot carry (NaN, Infinity -- msgpack and Python's JSON reader accept them, and one such value
    stored would make every later JSON answer that includes it fail) and nesting deeper than
    ``max_depth`` (kept iterative, so a hostile payload cannot exhaust the stack)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            raise CodecError(f"{what} nests deeper than {max_depth} levels")
        if isinstance(item, float) and not math.isfinite(item):
            raise CodecError(f"{what} holds {item!r}, which JSON cannot carry")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None: for numbers fedmq produces itself
    (a diverged training's NaN loss), which are reported as unknown rather than refused."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
