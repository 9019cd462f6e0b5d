"""Pages of a list: every list method answers ``{"items": [...], "next": cursor}`` and takes
``limit`` and ``cursor``, so no answer outgrows the broker's packet limit however large the fleet
or the history.  A page also ends early at PAGE_BYTES of items (measured in msgpack; JSON with
base64 stays under the RPC reply limit), so large rows -- 16 KiB events, say -- page instead of
failing at the default limit.  A cursor is opaque to callers (a position; items that change between two pages
may shift by one); ``next`` is null on the last page."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict, TypeVar

from peewee import ModelSelect

from fedmq.broker import codec
from fedmq.broker.errors import Invalid

T = TypeVar("T")
DEFAULT_LIMIT = 200
MAX_LIMIT = 1000
PAGE_BYTES = 256 * 1024


class Page(TypedDict):
    items: list[Any]
    next: str | None


def _offset(cursor: str | None) -> int:
    if cursor is None:
        return 0
    if not cursor.startswith("o") or not cursor[1:].isdigit() or len(cursor) > 12:
        raise Invalid(f"cursor {cursor[:40]!r} is not one this service gave out")
    return int(cursor[1:])


def _next(offset: int, count: int, more: bool) -> str | None:
    return f"o{offset + count}" if more else None


def _fill(found: Sequence[T], limit: int, row: Callable[[T], Any]) -> list[Any]:
    """Up to ``limit`` wire items, stopping before PAGE_BYTES (one item always fits)."""
    items: list[Any] = []
    size = 0
    for found_row in found[:limit]:
        item = row(found_row)
        size += len(codec.encode(item, codec.Codec.MSGPACK))
        if items and size > PAGE_BYTES:
            break
        items.append(item)
    return items


def _same(item: Any) -> Any:
    return item


def page(rows: Sequence[T], limit: int, cursor: str | None, row: Callable[[T], Any] = _same) -> Page:
    """A page of a list already in memory (and in order); ``row`` makes an item its wire form."""
    start = _offset(cursor)
    items = _fill(rows[start:start + limit], limit, row)
    return {"items": items, "next": _next(start, len(items), start + len(items) < len(rows))}


def page_query(query: ModelSelect[Any], limit: int, cursor: str | None, row: Callable[[Any], Any]) -> Page:
    """A page of an ordered query, read from the database one page (plus one row) at a time."""
    start = _offset(cursor)
    found = list(query.offset(start).limit(limit + 1))
    items = _fill(found, limit, row)
    return {"items": items, "next": _next(start, len(items), len(found) > len(items))}
