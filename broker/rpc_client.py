"""Calling fedmq services: one reply subscription per client, correlation ids in the payload."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import paho.mqtt.client as mqtt

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection
from fedmq.broker.envelope import EnvelopeError, ErrorCode, Reply, Request, RpcError
from fedmq.broker.topics import Topics, check_id

log = logging.getLogger("fedmq.broker.rpc")

DEFAULT_TIMEOUT_S = 10.0


class RpcClient:
    """Blocking ``call`` (thread-safe, any number of concurrent callers) and async ``acall``.

    ``caller`` is who we are on the wire: it is a topic level the broker ACL can bind to the
    connection's user, and the service only answers inside ``reply/<caller>/``.  Each client
    listens on its own inbox below that, so two processes sharing a caller id never see each
    other's replies.
    """

    def __init__(self, connection: MqttConnection, caller: str, topics: Topics | None = None,
                 *, codec_name: codec.Codec | str = codec.Codec.MSGPACK) -> None:
        self.connection = connection
        self.caller = check_id(caller, "caller")
        self.topics = topics or Topics()
        self.codec = codec.Codec(codec_name)
        self.inbox = self.topics.reply(self.caller, uuid.uuid4().hex[:16])
        self._pending: dict[str, Future[Reply]] = {}
        self._lock = threading.Lock()
        self._started = False
        self.stray_replies = 0

    def start(self) -> RpcClient:
        if not self._started:
            # Wait for SUBACK: a reply that arrives before the subscription exists is lost.
            self.connection.subscribe(self.inbox, self._on_reply, qos=1, wait=True)
            self._started = True
        return self

    def call(self, service: str, method: str, args: dict[str, Any] | None = None, *,
             timeout: float = DEFAULT_TIMEOUT_S, retries: int = 0) -> Any:
        """Call ``service.method(**args)``; returns the result or raises ``RpcError``.  With
        ``retries``, a call that timed out is sent again under the same request id: a replica
        that already answered it answers the same again, and when the one the broker gave it to
        died, another serves it."""
        request_id = uuid.uuid4().hex
        for attempt in range(retries + 1):
            try:
                return self.call_future(service, method, args, timeout=timeout,
                                        request_id=request_id).result_or_raise()
            except RpcError as exc:
                if exc.code is not ErrorCode.TIMEOUT or attempt == retries:
                    raise
                log.info("%s.%s: no answer within %.1f s, sending it again (%d/%d)",
                         service, method, timeout, attempt + 1, retries)
        raise AssertionError("unreachable")

    def call_future(self, service: str, method: str, args: dict[str, Any] | None = None, *,
                    timeout: float = DEFAULT_TIMEOUT_S, request_id: str | None = None) -> PendingCall:
        if not self._started:
            self.start()
        request = Request(id=request_id or uuid.uuid4().hex, method=method, args=args or {},
                          reply_to=self.inbox, deadline=time.time() + timeout)
        future: Future[Reply] = Future()
        with self._lock:
            self._pending[request.id] = future
        payload = codec.encode(request.to_wire(), self.codec)
        self.connection.publish(self.topics.rpc(service, method, self.caller), payload, qos=1)
        return PendingCall(self, request.id, future, timeout, f"{service}.{method}")

    def wait_for_service(self, service: str, timeout: float, *, ping_timeout: float = 1.0,
                         on_wait: Callable[[], None] | None = None) -> None:
        """Block until ``service`` answers ``ping`` (a request to a service that is not yet
        subscribed is simply lost, so a caller that may race a starting service asks first).
        ``on_wait`` runs once, when the first ping goes unanswered."""
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                self.call(service, "ping", timeout=min(ping_timeout, max(0.1, deadline - time.monotonic())))
                return
            except RpcError as exc:
                if exc.code is not ErrorCode.TIMEOUT or time.monotonic() >= deadline:
                    raise
            if not waited and on_wait is not None:
                on_wait()
            waited = True

    def all_items(self, service: str, method: str, args: dict[str, Any] | None = None, *,
                  limit: int = 1000, timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
        """Every item of a list method, page after page (``{"items": [...], "next": cursor}``)."""
        items: list[Any] = []
        cursor: str | None = None
        while True:
            page = self.call(service, method, {**(args or {}), "limit": limit,
                                               **({"cursor": cursor} if cursor else {})}, timeout=timeout)
            items.extend(page["items"])
            cursor = page.get("next")
            if not cursor:
                return items

    async def acall(self, service: str, method: str, args: dict[str, Any] | None = None, *,
                    timeout: float = DEFAULT_TIMEOUT_S) -> Any:
        import asyncio  # only async callers pay for it

        pending = self.call_future(service, method, args, timeout=timeout)
        try:
            reply = await asyncio.wait_for(asyncio.wrap_future(pending.future), timeout)
        except TimeoutError:
            raise pending.timeout_error() from None
        finally:
            self._forget(pending.request_id)
        return reply.raise_for_error()

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)

    def _on_reply(self, message: mqtt.MQTTMessage) -> None:
        try:
            body, _ = codec.decode(message.payload)
            reply = Reply.from_wire(body)
        except (codec.CodecError, EnvelopeError) as exc:
            log.warning("ignored a malformed reply on %s: %s", message.topic, exc)
            return
        with self._lock:
            future = self._pending.pop(reply.id, None) if reply.id else None
        if future is None:
            # Late (after a timeout) or duplicated (QoS 1 redelivery): nothing waits for it.
            self.stray_replies += 1
            log.debug("reply for unknown correlation id %r ignored", reply.id)
            return
        if not future.done():
            future.set_result(reply)


class PendingCall:
    """A call in flight; lets a caller fire many calls and then collect them."""

    def __init__(self, client: RpcClient, request_id: str, future: Future[Reply], timeout: float,
                 label: str) -> None:
        self.client, self.request_id, self.future = client, request_id, future
        self.timeout, self.label = timeout, label
        self._started = time.monotonic()

    def timeout_error(self) -> RpcError:
        return RpcError(ErrorCode.TIMEOUT, f"no reply to {self.label} within {self.timeout:g} s "
                                           "(is the service running and the broker reachable?)")

    def result_or_raise(self) -> Any:
        remaining = max(0.0, self.timeout - (time.monotonic() - self._started))
        try:
            reply = self.future.result(remaining)
        except FutureTimeout:
            raise self.timeout_error() from None
        finally:
            self.client._forget(self.request_id)
        return reply.raise_for_error()
