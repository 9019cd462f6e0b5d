"""Managing a broker's identities over Mosquitto's dynamic-security control topic.

Mosquitto's ``mosquitto_dynamic_security`` plugin (and the embedded broker, which answers the
same commands) takes JSON commands on ``$CONTROL/dynamic-security/v1`` and answers on
``.../response``; each command carries a ``correlationData`` we match the answer by.  Only a
connection whose credentials hold the control topics (the admin role) may use it.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

from fedmq.broker.acl import CONTROL_TOPIC
from fedmq.broker.connection import MqttConnection

RESPONSE_TOPIC = CONTROL_TOPIC + "/response"


class DynsecError(RuntimeError):
    """The broker refused a command (``Client already exists``, ``Role not found``, ...)."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"{command}: {error}")
        self.command, self.error = command, error


class DynsecClient:
    def __init__(self, connection: MqttConnection, timeout: float = 10.0) -> None:
        self.connection, self.timeout = connection, timeout
        self._waiting: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._lock = threading.Lock()
        self._subscribed = False

    def _on_response(self, message: Any) -> None:
        try:
            body = json.loads(bytes(message.payload))
        except ValueError:
            return
        for response in body.get("responses", []) if isinstance(body, dict) else []:
            key = response.get("correlationData") if isinstance(response, dict) else None
            with self._lock:
                waiter = self._waiting.get(key) if isinstance(key, str) else None
            if waiter is not None:
                waiter[1].append(response)
                waiter[0].set()

    def run(self, command: str, *, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """One command; its ``data`` (or ``{}``).  Raises ``DynsecError`` if the broker refused
        it and ``TimeoutError`` if nothing answered (no dynamic security on this broker, or these
        credentials may not use it)."""
        if not self._subscribed:
            self.connection.subscribe(RESPONSE_TOPIC, self._on_response, qos=1)
            self._subscribed = True
        key = uuid.uuid4().hex
        done: threading.Event = threading.Event()
        answers: list[dict[str, Any]] = []
        with self._lock:
            self._waiting[key] = (done, answers)
        try:
            payload = {"commands": [{"command": command, "correlationData": key, **fields}]}
            self.connection.publish(CONTROL_TOPIC, json.dumps(payload).encode(), qos=1)
            wait = self.timeout if timeout is None else timeout
            if not done.wait(wait):
                raise TimeoutError(f"the broker did not answer {command} on {CONTROL_TOPIC} within "
                                   f"{wait:g} s: is the dynamic-security plugin loaded, and may "
                                   "these credentials use it?")
        finally:
            with self._lock:
                self._waiting.pop(key, None)
        answer = answers[0]
        if answer.get("error"):
            raise DynsecError(command, str(answer["error"]))
        data = answer.get("data")
        return data if isinstance(data, dict) else {}

    # --- the commands fedmq uses ----------------------------------------------------------------
    def create_role(self, rolename: str, acls: list[dict[str, Any]]) -> None:
        self.run("createRole", rolename=rolename, acls=acls)

    def delete_role(self, rolename: str) -> None:
        self.run("deleteRole", rolename=rolename)

    def create_client(self, username: str, password: str, roles: list[str], clientid: str | None = None) -> None:
        fields: dict[str, Any] = {"username": username, "password": password,
                                  "roles": [{"rolename": r, "priority": 0} for r in roles]}
        if clientid is not None:
            fields["clientid"] = clientid
        self.run("createClient", **fields)

    def delete_client(self, username: str) -> None:
        self.run("deleteClient", username=username)

    def set_password(self, username: str, password: str) -> None:
        self.run("setClientPassword", username=username, password=password)

    def get_client(self, username: str) -> dict[str, Any]:
        return dict(self.run("getClient", username=username).get("client") or {})

    def list_clients(self) -> list[str]:
        return [str(c) if not isinstance(c, dict) else str(c.get("username"))
                for c in self.run("listClients", verbose=False).get("clients", [])]
