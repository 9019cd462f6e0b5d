"""Broker URLs with other credentials: what a task is handed instead of the cloud's own."""

from __future__ import annotations

import os
from urllib.parse import parse_qsl, quote, urlencode, urlparse, urlunparse

FILE_PARAMETERS = ("ca", "cert", "key")  # mqtts://...?ca=FILE&cert=FILE&key=FILE


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


def with_absolute_files(url: str, base: str | os.PathLike[str] | None = None) -> str:
    """``url`` with its certificate and key files made absolute (relative to ``base``, default the
    working directory).  Done where configuration is loaded: the URL is handed on to task
    processes, which run in their bundle folder, where a relative ``?ca=`` would point nowhere."""
    parsed = urlparse(url)
    if not parsed.query:
        return url
    query = parse_qsl(parsed.query, keep_blank_values=True)
    root = os.fspath(base) if base is not None else os.getcwd()
    fixed = [(k, os.path.normpath(os.path.join(root, os.path.expanduser(v))) if k in FILE_PARAMETERS and v else v)
             for k, v in query]
    return urlunparse(parsed._replace(query=urlencode(fixed, safe="/:")))
