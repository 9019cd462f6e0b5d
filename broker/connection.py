"""One MQTT connection, the way every fedmq component wants it.

Thin on purpose: paho-mqtt 2.x already reconnects with backoff and keeps QoS 1 messages in
flight across reconnects.  What this adds is what paho leaves to each application:
subscriptions that come back after a reconnect (also after a broker restart that lost the
session), TCP_NODELAY on the socket (a QoS 1 round trip drops from ~40 ms to ~1 ms on
loopback), waiting for CONNACK/SUBACK where a caller must not race them, and one URL format.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger("fedmq.broker.connection")

MessageCallback = Callable[[mqtt.MQTTMessage], None]
DEFAULT_URL = "mqtt://127.0.0.1:1883"
SESSION_EXPIRY_S = 24 * 3600


class BrokerUnavailable(RuntimeError):
    """The broker could not be reached or refused us within the time asked for."""


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to connect.  Built from a URL so one string configures a component:
    ``mqtt://user:pass@host:1883``, ``mqtts://host:8883?ca=ca.crt`` (TLS, the broker verified
    against that CA; ``&cert=c.crt&key=c.key`` for a client certificate), ``?protocol=5``."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    protocol: int = 4  # 4 = MQTT 3.1.1, 5 = MQTT 5
    keepalive: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_inflight: int = 100

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> BrokerSettings:
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"unsupported broker URL scheme {parsed.scheme!r} (use mqtt:// or mqtts://)")
        tls = parsed.scheme in ("mqtts", "ssl")
        query = dict(p.split("=", 1) for p in parsed.query.split("&") if "=" in p)
        protocol = {"3.1.1": 4, "311": 4, "4": 4, "5": 5}.get(query.get("protocol", "4"))
        if protocol is None:
            raise ValueError(f"unsupported MQTT protocol {query['protocol']!r} (use 3.1.1 or 5)")
        unknown = set(query) - {"protocol", "ca", "cert", "key"}
        if unknown:
            raise ValueError(f"unknown broker URL parameters {sorted(unknown)} (protocol, ca, cert, key)")
        values: dict[str, Any] = dict(
            host=parsed.hostname or "127.0.0.1",
            port=parsed.port or (8883 if tls else 1883),
            username=unquote(parsed.username) if parsed.username else None,
            password=unquote(parsed.password) if parsed.password else None,
            tls=tls, protocol=protocol,
            # mqtts:// verifies the broker's certificate against ?ca=FILE (default: the system's
            # trusted CAs); ?cert=&key= present a client certificate.
            ca_file=unquote(query["ca"]) if "ca" in query else None,
            cert_file=unquote(query["cert"]) if "cert" in query else None,
            key_file=unquote(query["key"]) if "key" in query else None)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        suffix = "?protocol=5" if self.protocol == 5 else ""
        return f"{scheme}://{self.host}:{self.port}{suffix}"


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass
class _Subscription:
    topic_filter: str
    qos: int
    callback: MessageCallback


def _callback_filter(topic_filter: str) -> str:
    """paho routes callbacks on the topic a message arrives on, which for a shared
    subscription (``$share/<group>/<filter>``) is the plain filter."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter


def new_client_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}"


class MqttConnection:
    """A supervised paho client: connect once, stay connected, restore subscriptions."""

    def __init__(self, client_id: str, settings: BrokerSettings | str = DEFAULT_URL, *,
                 persistent: bool = False, will: Will | None = None,
                 will_factory: Callable[[], Will] | None = None,
                 alternates: list[str] | None = None, drops_expected: bool = False) -> None:
        """``will_factory`` is asked for a fresh last will before every (re)connect (presence
        with a session counter needs that); ``alternates`` are further broker URLs (host and port
        are taken from them) tried in turn when a connection attempt fails; ``drops_expected``
        logs a lost connection as routine, not as a warning."""
        self.settings = BrokerSettings.from_url(settings) if isinstance(settings, str) else settings
        self.will_factory = will_factory
        self._endpoints = [(self.settings.host, self.settings.port)] + [
            (s.host, s.port) for s in (BrokerSettings.from_url(u) for u in alternates or [])]
        self._endpoint = 0
        self._failed_attempts = 0
        self.client_id = client_id
        self.persistent = persistent
        self.connected = threading.Event()
        self.connect_count = 0
        self._subs: dict[str, _Subscription] = {}
        self._sub_waiters: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self._connect_listeners: list[Callable[[bool], None]] = []
        self._last_refusal: str | None = None
        self._connect_failures = 0
        self._resubscribed = threading.Event()
        self._started = False
        self._drop_level = logging.INFO if drops_expected else logging.WARNING

        protocol = MQTTProtocolVersion.MQTTv5 if self.settings.protocol == 5 else MQTTProtocolVersion.MQTTv311
        kwargs: dict[str, Any] = dict(callback_api_version=CallbackAPIVersion.VERSION2,
                                      client_id=client_id, protocol=protocol)
        if protocol is MQTTProtocolVersion.MQTTv311:
            kwargs["clean_session"] = not persistent
        self.client = mqtt.Client(**kwargs)
        self.client.max_inflight_messages_set(self.settings.max_inflight)
        self.client.reconnect_delay_set(self.settings.reconnect_min_s, self.settings.reconnect_max_s)  # type: ignore[arg-type]
        if self.settings.username:
            self.client.username_pw_set(self.settings.username, self.settings.password)
        if self.settings.tls:
            self.client.tls_set(ca_certs=self.settings.ca_file, certfile=self.settings.cert_file,
                                keyfile=self.settings.key_file, cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            self.client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self.client.on_pre_connect = self._on_pre_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_socket_open = self._on_socket_open
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_unrouted_message

    @property
    def is_v5(self) -> bool:
        return self.settings.protocol == 5

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = 10.0, *, fail_fast: bool = False) -> MqttConnection:
        """Connect in the background; paho keeps reconnecting with backoff from here on."""
        if self._started:
            return self
        self._started = True
        properties = None
        clean_start: Any = mqtt.MQTT_CLEAN_START_FIRST_ONLY
        if self.is_v5:
            properties = Properties(PacketTypes.CONNECT)
            if self.persistent:
                properties.SessionExpiryInterval = SESSION_EXPIRY_S
                clean_start = False
            else:
                clean_start = True
        host, port = self._endpoints[self._endpoint]
        self.client.connect_async(host, port,
                                  keepalive=self.settings.keepalive,
                                  clean_start=clean_start, properties=properties)
        self.client.loop_start()
        if wait:
            self.wait_connected(timeout, fail_fast=fail_fast)
        return self

    def wait_connected(self, timeout: float = 10.0, *, fail_fast: bool = False) -> None:
        """Wait for CONNACK.  With ``fail_fast`` (a command a person waits for) give up at the first
        attempt the network or the broker refuses, saying why; otherwise (services) keep trying."""
        deadline = time.monotonic() + timeout
        while not self.connected.wait(0.05):
            refused = fail_fast and (self._connect_failures or self._last_refusal)
            if refused or time.monotonic() >= deadline:
                why = self._last_refusal or (self._network_error() if fail_fast else None)
                where = ", ".join(f"{h}:{p}" for h, p in self._endpoints)
                raise BrokerUnavailable(
                    f"no connection to the MQTT broker at {where}" + (f" ({why})" if why else
                                                                       f" within {timeout:g} s"))

    def _network_error(self) -> str | None:
        host, port = self._endpoints[self._endpoint]
        try:
            with socket.create_connection((host, port), timeout=2.0):
                return None
        except OSError as exc:
            return exc.strerror or str(exc)

    def stop(self) -> None:
        """Disconnect cleanly (a clean disconnect does not fire the last will)."""
        if not self._started:
            return
        self._started = False
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
            self.connected.clear()

    def __enter__(self) -> MqttConnection:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_connect_listener(self, listener: Callable[[bool], None]) -> None:
        """``listener(session_present)`` runs in paho's thread after every (re)connect."""
        self._connect_listeners.append(listener)

    # --- pub/sub ---------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, callback: MessageCallback, qos: int = 1,
                  wait: bool = True, timeout: float = 10.0) -> None:
        """Subscribe now (if connected) and again after every reconnect."""
        with self._lock:
            self._subs[topic_filter] = _Subscription(topic_filter, qos, callback)
        self.client.message_callback_add(_callback_filter(topic_filter), self._guard(callback))
        if not self.connected.is_set():
            if wait:
                self.wait_connected(timeout)  # on_connect subscribes it; fall through to wait again
            else:
                return
        event = threading.Event()
        generation = self.connect_count
        with self._lock:
            result, mid = self.client.subscribe(topic_filter, qos)
            if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self._sub_waiters[mid] = event
        if not wait:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if event.wait(0.05):
                return
            # Lost the connection meanwhile: the reconnect re-subscribes everything we hold,
            # so that SUBACK counts as ours.
            if self.connect_count != generation and self._resubscribed.wait(0.05):
                return
        raise BrokerUnavailable(f"no SUBACK for {topic_filter!r} within {timeout:g} s")

    def wait_subscribed(self, timeout: float = 10.0) -> None:
        """Wait until the broker has acknowledged the subscriptions made on (re)connect."""
        if not self._resubscribed.wait(timeout):
            raise BrokerUnavailable(f"no SUBACK for {len(self._subs)} subscription(s) within {timeout:g} s")

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._subs.pop(topic_filter, None)
        self.client.message_callback_remove(_callback_filter(topic_filter))
        if self.connected.is_set():
            self.client.unsubscribe(topic_filter)

    def publish(self, topic: str, payload: bytes | str | None, qos: int = 1, retain: bool = False,
                properties: Properties | None = None) -> mqtt.MQTTMessageInfo:
        """Publish; while disconnected paho queues QoS >= 1 messages and sends them on reconnect."""
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)

    # --- paho callbacks --------------------------------------------------------------------
    def _guard(self, callback: MessageCallback) -> Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]:
        def run(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
            try:
                callback(message)
            except Exception:  # a bad message must never kill paho's network thread
                log.exception("message handler failed for topic %s", message.topic)
        return run

    def _on_pre_connect(self, client: mqtt.Client, _userdata: Any) -> None:
        # Runs in paho's thread before every connection attempt.
        if self._failed_attempts > 0 and len(self._endpoints) > 1:
            self._endpoint = (self._endpoint + 1) % len(self._endpoints)
            client.host, client.port = self._endpoints[self._endpoint]
            log.info("%s trying broker %s:%s", self.client_id, client.host, client.port)
        self._failed_attempts += 1
        if self.will_factory is not None:
            will = self.will_factory()
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        self._connect_failures += 1

    @staticmethod
    def _on_socket_open(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):  # not a TCP socket (e.g. a unix socket): nothing to do
            pass

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any,
                    _properties: Any) -> None:
        if reason.is_failure:
            self._last_refusal = f"broker refused the connection: {reason}"
            log.warning("%s: %s", self.client_id, self._last_refusal)
            return
        self.connect_count += 1
        self._failed_attempts = 0
        with self._lock:
            subs = list(self._subs.values())
            self._resubscribed = threading.Event()
            if subs:
                _, mid = client.subscribe([(s.topic_filter, s.qos) for s in subs])
                if mid is not None:
                    self._sub_waiters[mid] = self._resubscribed
            else:
                self._resubscribed.set()
        self.connected.set()
        session_present = bool(getattr(flags, "session_present", False))
        log.info("%s connected to %s (session present: %s)", self.client_id,
                 self.settings.url, session_present)
        for listener in list(self._connect_listeners):
            try:
                listener(session_present)
            except Exception:
                log.exception("connect listener failed")

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any,
                       _properties: Any) -> None:
        self.connected.clear()
        if self._started:
            log.log(self._drop_level, "%s lost the broker (%s); paho reconnects with backoff", self.client_id, reason)

    def _on_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int, reason_codes: Any,
                      _properties: Any) -> None:
        failures = [rc for rc in reason_codes if getattr(rc, "is_failure", False)]
        if failures:
            log.error("%s: broker refused a subscription (mid %s): %s", self.client_id, mid, failures)
        with self._lock:
            event = self._sub_waiters.pop(mid, None)
        if event is not None:
            event.set()

    @staticmethod
    def _on_unrouted_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        log.debug("message on %s matched no handler", message.topic)
