"""Broker URLs with other credentials: what a task is handed instead of the cloud's own."""

from __future__ import annotations

from urllib.parse import quote, urlparse, urlunparse


def with_credentials(url: str, username: str | None, password: str | None) -> str:
    """``url`` with its user and password replaced (``None``: no password, or no user at all)."""
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    host = parsed.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    if username:
        userinfo = quote(username, safe="") + (f":{quote(password, safe='')}" if password else "")
        netloc = f"{userinfo}@{netloc}"
    return urlunparse(parsed._replace(netloc=netloc))


def without_credentials(url: str) -> str:
    """For logs and banners."""
    return with_credentials(url, None, None)
