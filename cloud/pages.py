"""Pages of a list: every list method answers ``{"items": [...], "next": cursor}`` and takes
``limit`` and ``cursor``, so no answer outgrows the broker's packet limit however large the fleet
or the history.  A cursor is opaque to callers (a position; items that change between two pages
may shift by one); ``next`` is null on the last page."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypedDict, TypeVar

from peewee import ModelSelect

from fedmq.broker.errors import Invalid

T = TypeVar("T")
DEFAULT_LIMIT = 200
MAX_LIMIT = 1000


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


def page(rows: Sequence[T], limit: int, cursor: str | None) -> Page:
    """A page of a list already in memory (and in order)."""
    start = _offset(cursor)
    items = list(rows[start:start + limit])
    return {"items": items, "next": _next(start, len(items), start + limit < len(rows))}


def page_query(query: ModelSelect[Any], limit: int, cursor: str | None, row: Callable[[Any], Any]) -> Page:
    """A page of an ordered query, read from the database one page (plus one row) at a time."""
    start = _offset(cursor)
    found = list(query.offset(start).limit(limit + 1))
    items = [row(r) for r in found[:limit]]
    return {"items": items, "next": _next(start, len(items), len(found) > limit)}
