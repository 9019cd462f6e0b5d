"""The fuzzing corpus: hypothesis strategies for what arrives from outside, and the contract each
parser must keep with it -- answer, or refuse with its own error type; never crash, never write
outside its folder.  tests/test_fuzz.py runs every target a few hundred times per CI run;
bench/fuzz.py runs each >= 10,000 times and counts crashes.

A target is (strategy, check): ``check(case)`` raises only when the contract is broken.
"""

from __future__ import annotations

import gzip
import io
import logging
import queue
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from fedmq.broker import codec
from fedmq.broker.connection import MqttConnection, new_client_id
from fedmq.broker.criteria import CriteriaError, parse_criteria, requirements_met
from fedmq.broker.embedded import EmbeddedBroker
from fedmq.broker.envelope import EnvelopeError, Request
from fedmq.broker.rpc_client import RpcClient
from fedmq.ftdl.bundle import BundleError, BundleManifest, safe_unpack
from fedmq.ftdl.manifest import ManifestError, parse_manifest

# --- values as they arrive: JSON and msgpack trees, including what JSON cannot carry ------------------
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40) | st.binary(max_size=40))
keys = st.text(max_size=12) | st.sampled_from(["id", "args", "reply_to", "deadline", "v", "method", "task", "name",
                                                "bundle", "info", "limit", "cursor", "digest", "index", "data"])
trees = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(keys, inner, max_size=6),
                     max_leaves=40)
objects = st.dictionaries(keys, trees, max_size=8)


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    """A valid encoding with bytes flipped, cut or inserted: what a flaky link or an attacker sends."""
    out = bytearray(data)
    for position, value in edits:
        if not out:
            out.append(value)
            continue
        at = position % (len(out) + 1)
        if value % 3 == 0:
            out.insert(at, value)
        elif value % 3 == 1 and at < len(out):
            out[at] = value
        else:
            del out[at:at + 1 + value % 8]
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=6)
payloads = (st.binary(max_size=300)
            | st.builds(lambda tree, kind, e: _mutate(codec.encode(codec.finite(tree), kind), e),
                        trees, st.sampled_from(["json", "msgpack"]), edits))


# --- the targets -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]


def check_decode(payload: bytes) -> None:
    try:
        body, kind = codec.decode(payload)
    except codec.CodecError:
        return
    assert kind in (codec.Codec.JSON, codec.Codec.MSGPACK)
    try:
        codec.check_tree(body)
    except codec.CodecError:
        pass


finite_trees = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=40)


# Messages are objects or arrays: that is how a payload's first byte tells JSON from msgpack.
finite_messages = st.dictionaries(st.text(max_size=12), finite_trees, max_size=6) | st.lists(finite_trees, max_size=6)


def check_roundtrip(case: tuple[Any, str]) -> None:
    tree, kind = case
    assert codec.decode(codec.encode(tree, kind))[0] == tree


def check_envelope(case: tuple[Any, str, str | None]) -> None:
    body, method, reply_to = case
    try:
        request = Request.from_wire(body, method=method, reply_to=reply_to)
    except EnvelopeError:
        return
    assert request.method == method and request.id and request.reply_to


CRITERIA_TOKENS = ["data_quantity", "cpu_count", "memory_mb", "labels", "region", "packages", "online", "and",
                   "or", "not", "in", "==", "!=", ">=", "<", "+", "-", "*", "/", "%", "**", "(", ")", "[", "]",
                   ",", ".", "'eu'", '"x"', "0", "1", "1e308", "-1", "True", "None", "has_package", "('numpy>=1')",
                   "__import__", "__class__", "lambda", ":", "x", "if", "else", "{", "}", "f'{1}'", "'a' * 99"]
criteria_sources = st.text(max_size=80) | st.lists(st.sampled_from(CRITERIA_TOKENS), max_size=25).map(" ".join)
device_infos = st.fixed_dictionaries({}, optional={
    "data_quantity": trees, "cpu_count": trees, "memory_mb": trees, "labels": trees, "packages": trees,
    "online": trees, "region": trees})


def check_criteria(case: tuple[str, dict[str, Any], dict[str, Any]]) -> None:
    source, info, requirements = case
    try:
        criteria = parse_criteria(source)
    except CriteriaError:
        return
    assert isinstance(criteria.matches(info), bool)
    assert criteria.matches(info) == criteria.interpret(info)  # compiled == the reference walk
    met, reason = requirements_met(requirements, info)
    assert isinstance(met, bool) and isinstance(reason, str)


MANIFEST_KEYS = ["task", "name", "description", "server", "client", "entry", "args", "env", "requirements",
                 "triggers", "command", "timeout_s", "python", "packages", "min_memory_mb", "min_cpus"]
manifest_trees = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(MANIFEST_KEYS) | keys,
                                                                          inner, max_size=6), max_leaves=30)
manifests = st.dictionaries(st.sampled_from(MANIFEST_KEYS) | keys, manifest_trees, max_size=6)


def check_manifest(data: dict[str, Any]) -> None:
    try:
        parse_manifest(data)
    except ManifestError:
        pass
    try:
        BundleManifest.from_wire(data)
    except BundleError:
        pass


# Bundle archives: members with hostile names, kinds and sizes; a real fedmq.toml sometimes.
MEMBER_NAMES = ["fedmq.toml", "server.py", "client.py", "a/b.py", "../escape.py", "/etc/passwd", "a/../../x",
                "./ok.py", "dir/", "", ".", "..", "a//b", "x" * 300, "ñ.py", "a\\b.py", "a/\x00b"]
VALID_TOML = b'[task]\nname = "f"\n[server]\nentry = "server.py"\n[client]\nentry = "client.py"\n'
members = st.tuples(st.sampled_from(MEMBER_NAMES) | st.text(max_size=30),
                    st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                     tarfile.CHRTYPE, tarfile.FIFOTYPE]),
                    st.sampled_from([b"", b"print(1)\n", VALID_TOML]) | st.binary(max_size=200),
                    st.sampled_from(["", "/etc/passwd", "../../x", "server.py"]),
                    st.integers(0, 0o7777))
archives = st.one_of(
    st.lists(members, max_size=8).map(lambda ms: ("tar", ms)),
    st.binary(max_size=400).map(lambda b: ("raw", b)),
    st.tuples(st.lists(members, max_size=6), edits).map(lambda c: ("mutated", c)))


def _tar_gz(entries: list[tuple[str, bytes, str, int, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, kind, data, link, mode in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname = kind, mode, link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            try:
                tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
            except (ValueError, UnicodeError):  # a name tarfile itself cannot write: left out
                continue
    return gzip.compress(raw.getvalue())


def check_unpack(case: tuple[str, Any]) -> None:
    kind, value = case
    if kind == "tar":
        blob = _tar_gz(value)
    elif kind == "raw":
        blob = value
    else:
        blob = _mutate(_tar_gz(value[0]), value[1])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive, dest = root / "bundle.tar.gz", root / "store" / "dest"
        archive.write_bytes(blob)
        try:
            safe_unpack(archive, dest)
        except (BundleError, ManifestError):
            pass
        written = {p.relative_to(root).parts[:2] for p in root.rglob("*")}
        assert written <= {("bundle.tar.gz",), ("store",), ("store", "dest")}, written  # nothing outside
        if not dest.exists():  # refused: no staging folder is left behind either
            assert not (root / "store").exists() or not any((root / "store").iterdir())


TARGETS: dict[str, Target] = {
    "codec": Target(payloads, check_decode),
    "codec_roundtrip": Target(st.tuples(finite_messages, st.sampled_from(["msgpack", "json"])), check_roundtrip),
    "envelope": Target(st.tuples(trees | objects, st.sampled_from(["list", "create", "x"]),
                                 st.none() | st.text(max_size=30)), check_envelope),
    "criteria": Target(st.tuples(criteria_sources, device_infos, objects), check_criteria),
    "manifest": Target(manifests, check_manifest),
    "unpack": Target(archives, check_unpack),
}


# --- the RPC server: random and mutated requests against every method of every service -----------------
class CrashLog(logging.Handler):
    """Every log record with a traceback, and every error, from fedmq: bad input must cause neither."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("fedmq") or record.exc_info:
            self.records.append(record)


CALLERS = ["operator", "dashboard", "dev-1", "fuzz-1", "cloud"]


@dataclass
class RpcFuzz:
    """A cloud (every service) on the embedded broker, and a raw client that sends what the case says."""

    raw: MqttConnection
    methods: dict[str, list[str]]
    replies: queue.Queue[Any] = field(default_factory=queue.Queue)
    internal: list[Any] = field(default_factory=list)
    cases: int = 0

    def strategy(self) -> st.SearchStrategy[Any]:
        names = [f"{s}.{m}" for s, methods in self.methods.items() for m in methods]
        known = st.sampled_from(names) | st.sampled_from(["tasks.nope", "nope.list", "tasks.__init__"])
        envelope = st.fixed_dictionaries({"id": st.just(""), "reply_to": st.just("")},
                                         optional={"args": objects | trees, "deadline": trees, "v": trees,
                                                   "method": st.text(max_size=10), "extra": trees})
        return st.tuples(known, st.sampled_from(CALLERS), envelope, st.sampled_from(["json", "msgpack"]),
                         st.none() | edits | st.binary(max_size=200))

    def check(self, case: tuple[str, str, dict[str, Any], str, Any]) -> None:
        name, caller, envelope, kind, damage = case
        service, method = name.split(".", 1)
        request_id = uuid.uuid4().hex
        body = {**envelope, "id": request_id, "reply_to": f"fedmq/v1/reply/{caller}/fuzz"}
        try:
            payload = codec.encode(body, kind)
        except codec.CodecError:  # NaN in JSON, say: send it as msgpack, which carries it
            payload = codec.encode(body, "msgpack")
        if isinstance(damage, bytes):
            payload = damage
        elif damage is not None:
            payload = _mutate(payload, damage)
        self.cases += 1
        self.raw.publish(f"fedmq/v1/rpc/{service}/{method}/{caller}", payload, qos=1).wait_for_publish(5)
        deadline_value = envelope.get("deadline")
        expired = (isinstance(deadline_value, (int, float)) and not isinstance(deadline_value, bool)
                   and not deadline_value > time.time())  # NaN too: never in the future
        if damage is not None or service not in self.methods or expired:
            # Unanswerable by design (undecodable, no such service here, or too late): the
            # end-of-run checks say whether it did any harm.
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                reply = self.replies.get(timeout=0.5)
            except queue.Empty:
                continue
            if reply.get("id") == request_id:
                error = reply.get("error") or {}
                assert error.get("code") != "internal", (name, caller, envelope, error)
                return
        raise AssertionError(f"{name} from {caller} was never answered: {envelope!r}")

    def _on_reply(self, message: Any) -> None:
        try:
            body = codec.decode(message.payload)[0]
        except codec.CodecError:
            return
        if isinstance(body, dict):
            self.replies.put(body)


@contextmanager
def rpc_fuzz(workdir: Path) -> Iterator[tuple[RpcFuzz, Callable[[], None]]]:
    """Yields the target and ``verify()``: every service still answers ping, and nothing crashed."""
    from fedmq.cloud.app import CloudApp, CloudConfig

    crashes = CrashLog()
    logging.getLogger().addHandler(crashes)
    broker = EmbeddedBroker().start()
    cloud = CloudApp(CloudConfig(broker=broker.url, home=workdir / "cloud", client_id=new_client_id("cloud"))).start()
    raw = MqttConnection(new_client_id("fuzz"), broker.url).start()
    operator_conn = MqttConnection(new_client_id("fuzz-op"), broker.url).start()
    try:
        operator = RpcClient(operator_conn, "operator").start()
        methods = {name: sorted(served.methods) for name, served in cloud.server.services.items()}
        fuzz = RpcFuzz(raw, methods)
        raw.subscribe("fedmq/v1/reply/+/fuzz", fuzz._on_reply, qos=1)

        def verify() -> None:
            for service in methods:
                assert operator.call(service, "ping", timeout=10)["pong"] is True
            assert not crashes.records, [r.getMessage() for r in crashes.records[:5]]

        yield fuzz, verify
    finally:
        logging.getLogger().removeHandler(crashes)
        for conn in (raw, operator_conn):
            conn.stop()
        cloud.stop()
        broker.stop()
