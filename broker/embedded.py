"""The embedded broker: amqtt, run in a background thread so synchronous code can own it.

Used by ``fedmq broker``, the demo and the tests.  amqtt speaks MQTT 3.1.1 only and keeps
retained messages and sessions in memory (a restart forgets them), which is why everything in
fedmq works on 3.1.1 and republishes its retained state after reconnecting.  For production use
Mosquitto with the repository's ``mosquitto.conf``.

amqtt 0.11 (and 0.12, whose source has the same code) departs from MQTT in two ways that fedmq
users hit, both fixed here around it and each proven by ``tests/test_brokers.py``, which also
checks that the stock broker still misbehaves (so the workaround is dropped once upstream fixes it):

- On every connect it sends the new client every retained message that matches *any* client's
  subscription on the broker (a ``mosquitto_sub -t foo/bar`` printed every bundle chunk, presence
  and announcement), awaiting while it iterates the broker-wide subscription table -- which other
  clients change meanwhile (``RuntimeError: dictionary changed size during iteration``).  MQTT
  sends retained messages when a client subscribes, never on connect: that replay is skipped.
- A client admitted by its anonymous-auth plugin is marked anonymous, and amqtt then neither
  queues QoS 1 messages for its persistent session nor keeps the session: an open broker here
  admits clients without that mark, so persistent sessions behave as on Mosquitto.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from amqtt.broker import Action, Broker
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from fedmq.broker.acl import CONTROL_TOPIC
from fedmq.broker.dynamic_security import DynamicSecurity

log = logging.getLogger("fedmq.broker.embedded")


class OpenAuthPlugin(BaseAuthPlugin):
    """Admits every client without marking it anonymous (amqtt drops anonymous clients'
    persistent sessions and queued messages; see the module docstring)."""

    async def authenticate(self, *, session: Session) -> bool | None:
        return True


class PasswordAuthPlugin(BaseAuthPlugin):
    """Username/password check against an in-memory table (constant-time compare)."""

    async def authenticate(self, *, session: Session) -> bool | None:
        users: dict[str, str] = self.config.users
        expected = users.get(session.username or "")
        if expected is None or session.password is None:
            return False
        return hmac.compare_digest(expected.encode(), str(session.password).encode())

    @dataclass
    class Config:
        users: dict[str, str] = field(default_factory=dict)


class _Broker(Broker):
    """amqtt's broker without the connect-time replay of other clients' retained messages, and,
    with ``security`` set, Mosquitto's dynamic-security rules (``broker.dynamic_security``)."""

    def __init__(self, *args: Any, security: DynamicSecurity | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._connecting: set[int] = set()
        self.security = security
        if security is not None:
            security.on_kick = self._kick_soon

    # --- dynamic security ----------------------------------------------------------------------
    async def _authenticate(self, session: Session, listener: Any) -> bool:
        if self.security is None:
            return await super()._authenticate(session, listener)
        return self.security.authenticate(session.username, session.password, session.client_id)

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[Any, Session]:
        """amqtt merges a connecting client into the session of its client id -- or, with a clean
        session, deletes that session -- before it authenticates it, so a client with wrong
        credentials or a client id not its own could still evict or alter another's session.
        With dynamic security, the credentials and the bound client id are checked first."""
        if self.security is None:
            return await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except (AMQTTError, MQTTError, NoDataError) as exc:
            await writer.close()
            raise AMQTTError(exc) from exc
        if not self.security.authenticate(session.username, session.password, session.client_id):
            session.parent = 0
            handler.attach(session, reader, writer)
            await handler.mqtt_connack_authorize(False)  # CONNACK 5: not authorized
            await writer.close()
            raise AMQTTError(f"refused {session.username!r} as {session.client_id!r}: not authorized")
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        elif session.client_id in self._sessions:
            existing, _ = self._sessions[session.client_id]
            for name in ("will_flag", "will_message", "will_topic", "will_qos", "keep_alive", "username", "password"):
                setattr(existing, name, getattr(session, name))
            session, session.parent = existing, 1
        else:
            session.parent = 0
        return handler, session

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        if self.security is None:
            return await super()._topic_filtering(session, topic, action)
        kind = {Action.PUBLISH: "publishClientSend", Action.RECEIVE: "publishClientReceive",
                Action.SUBSCRIBE: "subscribe"}[action]
        return self.security.allowed(session.username, kind, topic)

    async def _handle_message_delivery(self, client_session: Session, handler: Any, wait_deliver: Any) -> bool:
        message = wait_deliver.result()
        if self.security is not None and message is not None and message.topic == CONTROL_TOPIC:
            # amqtt refuses every $ topic a client publishes; this one is dynamic security's.
            if self.security.allowed(client_session.username, "publishClientSend", message.topic):
                try:
                    request = json.loads(bytes(message.data))
                except ValueError:
                    request = {}
                answer = self.security.handle(request if isinstance(request, dict) else {})
                await self._broadcast_message(None, CONTROL_TOPIC + "/response", json.dumps(answer).encode())
            return True
        return await super()._handle_message_delivery(client_session, handler, wait_deliver)

    def _kick_soon(self, username: str) -> None:
        """Disconnect every connection of ``username`` (its credentials were revoked or changed)."""
        loop = self._loop

        async def kick() -> None:
            for client_id, (session, handler) in list(self._sessions.items()):
                if session.username == username and session.transitions.is_connected():
                    log.info("disconnecting %s (%s): its credentials changed", client_id, username)
                    writer = getattr(handler, "writer", None)
                    if writer is not None:
                        await writer.close()

        asyncio.run_coroutine_threadsafe(kick(), loop) if loop.is_running() else None

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # amqtt calls this on connect, right before the replay loop; _client_message_loop
        # follows the loop.  Between the two, the session is "connecting".
        await super()._publish_session_retained_messages(session)
        self._connecting.add(id(session))

    async def _client_message_loop(self, client_session: Session, handler: Any) -> None:
        self._connecting.discard(id(client_session))
        await super()._client_message_loop(client_session, handler)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        if id(session) in self._connecting:
            return  # returns without awaiting: the broker-wide loop over subscriptions never yields
        await super()._publish_retained_messages_for_subscription(subscription, session)


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` (``port=0`` picks a free one; read ``.port`` after start)."""

    broker_class: type[Broker] = _Broker  # tests swap in amqtt's own to show what is fixed

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 users: dict[str, str] | None = None, security: DynamicSecurity | None = None) -> None:
        """``users``: static username/password pairs with full access; ``security``: Mosquitto's
        dynamic-security rules instead, managed over its control topic."""
        self.host = host
        self.port = port
        self.users = dict(users or {})
        self.security = security
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Broker | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        if self.users:
            auth: dict[str, Any] = {f"{__name__}.PasswordAuthPlugin": {"users": self.users}}
        else:
            auth = {f"{__name__}.OpenAuthPlugin": {}}
        return {"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": auth}

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        if self._thread is not None:
            return self
        # amqtt logs every packet at INFO; keep our logs readable.
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"embedded broker did not start within {timeout:g} s")
        if self._error is not None:
            self._thread = None
            raise RuntimeError(f"embedded broker failed to start on {self.host}:{self.port}: {self._error}")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            if self.security is not None and issubclass(self.broker_class, _Broker):
                self._broker = self.broker_class(self._config(), loop=loop, security=self.security)
            else:
                self._broker = self.broker_class(self._config(), loop=loop)
            await self._broker.start()
            server = self._broker._servers["default"].instance  # amqtt exposes no public accessor
            self.port = server.sockets[0].getsockname()[1]

        # A failed start (a port taken) is reported once, by start(), not as amqtt's traceback too.
        amqtt_log = logging.getLogger("amqtt.broker")
        level = amqtt_log.level
        amqtt_log.setLevel(logging.CRITICAL)
        try:
            loop.run_until_complete(boot())
        except BaseException as exc:  # reported to start() in the caller's thread
            self._error = exc
            self._ready.set()
            loop.close()
            return
        finally:
            amqtt_log.setLevel(level)
        self._ready.set()
        loop.run_forever()
        loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None or self._loop is None:
            return
        loop = self._loop
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            future.result(max(timeout, 10.0))
        except Exception:
            log.warning("embedded broker shutdown was not clean", exc_info=True)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        self._thread = None
        self._loop = None
        self._broker = None

    async def _shutdown(self) -> None:
        broker = self._broker
        if broker is None:
            return
        # Listeners first: the port is free at once, whatever amqtt's own shutdown does next.
        for server in list(broker._servers.values()):
            instance = getattr(server, "instance", None)
            if instance is not None:
                instance.close()
        try:
            await asyncio.wait_for(broker.shutdown(), 5.0)
        except (Exception, asyncio.CancelledError):
            # amqtt's shutdown can hang on, or be cancelled by, its own session tasks.
            log.debug("amqtt shutdown did not complete", exc_info=True)
        # Whatever connections are left are cut, so clients notice at once (as with a real
        # broker going down) instead of at their next keep-alive.
        loop = asyncio.get_running_loop()
        for transport in list(getattr(loop, "_transports", {}).values()):
            if transport is not None and not transport.is_closing():
                transport.abort()
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start on the same port.  Like a real restart of amqtt, retained messages
        and sessions are gone afterwards."""
        self.stop(timeout)
        self.start(timeout)

    kill = stop  # an in-process broker has no harder way to die

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Block until interrupted (the foreground mode of ``fedmq broker``)."""
        self.start()
        assert self._thread is not None
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
