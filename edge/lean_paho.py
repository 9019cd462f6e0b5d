"""paho for an idle agent, without OpenSSL's hash functions mapped.

``paho.mqtt.client`` imports ``hashlib`` (and ``urllib.request``, which imports it too) at module
level, for the websocket handshake's SHA-1 and HTTP digest authentication: nothing a device
on ``mqtt://`` or ``mqtts://`` uses.  hashlib's OpenSSL backend, ``_hashlib``, costs ~2.2 MB of
resident memory when imported in a bare process and 0.5 MB on the running agent (bench.edge_idle,
27.2 -> 26.7 MB): the share of libcrypto that ``ssl`` does not touch.
Importing paho while ``_hashlib`` is unavailable gives those two modules hashlib's built-in
digests; then both entries leave ``sys.modules``, so the next ``import hashlib`` -- the first
bundle or model verification -- loads the OpenSSL-backed module as every other program would.
TLS is unaffected: ``ssl`` has its own binding to OpenSSL and is imported as usual.
"""

from __future__ import annotations

import sys


def import_paho_lean() -> bool:
    """Import paho as described; False when it was too late (paho or hashlib already loaded)."""
    if "paho.mqtt.client" in sys.modules or "hashlib" in sys.modules or "_hashlib" in sys.modules:
        return False
    sys.modules["_hashlib"] = None  # type: ignore[assignment]  # an ImportError for whoever asks
    try:
        import paho.mqtt.client  # noqa: F401
    finally:
        del sys.modules["_hashlib"]
        sys.modules.pop("hashlib", None)
    return True
