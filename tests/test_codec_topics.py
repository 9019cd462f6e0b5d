"""The codec and the topic tree: pure functions, no broker needed."""

import pytest

from fedmq.broker import codec
from fedmq.broker.envelope import EnvelopeError, Reply, Request
from fedmq.broker.topics import TopicError, Topics


def test_detects_json_and_msgpack() -> None:
    assert codec.detect(b'  {"a": 1}') is codec.Codec.JSON
    assert codec.detect(b"[1]") is codec.Codec.JSON
    assert codec.detect(b"\xef\xbb\xbf{}") is codec.Codec.JSON
    assert codec.detect(codec.encode({"a": 1})) is codec.Codec.MSGPACK


@pytest.mark.parametrize("kind", list(codec.Codec))
def test_round_trip(kind: codec.Codec) -> None:
    value = {"s": "é", "n": 3, "f": 1.5, "l": [1, None, True], "m": {"k": "v"}}
    assert codec.decode(codec.encode(value, kind)) == (value, kind)


def test_bytes_become_base64_in_json() -> None:
    assert codec.decode(codec.encode({"b": b"\x00\x01"}, "json"))[0] == {"b": "AAE="}


@pytest.mark.parametrize("payload", [b"\xc1", b"{not json", b"\x81\xa1a", b"\x01\x02", b"{}}", b""])
def test_garbage_is_a_codec_error(payload: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(payload)


def test_unencodable_values_are_codec_errors() -> None:
    with pytest.raises(codec.CodecError):
        codec.encode({"x": object()})
    with pytest.raises(codec.CodecError):
        codec.encode({"x": float("nan")}, "json")


def test_topics_build_and_parse() -> None:
    topics = Topics("acme/fl")
    topic = topics.rpc("tasks", "create", "dev-1")
    assert topic == "acme/fl/rpc/tasks/create/dev-1"
    parsed = topics.parse_rpc(topic)
    assert (parsed.service, parsed.method, parsed.caller) == ("tasks", "create", "dev-1")
    assert topics.bundle_chunk("a" * 64, 3) == f"acme/fl/bundles/{'a' * 64}/3"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a+b", "x" * 200, "../x", "é", None, 3])
def test_ids_that_would_break_the_tree_are_refused(bad: object) -> None:
    with pytest.raises(TopicError):
        Topics().rpc("tasks", "create", bad)  # type: ignore[arg-type]


def test_reply_topics_stay_in_the_callers_tree() -> None:
    topics = Topics()
    assert topics.reply_allowed("fedmq/v1/reply/dev-1/inbox", "dev-1")
    assert not topics.reply_allowed("fedmq/v1/reply/dev-2/inbox", "dev-1")
    assert not topics.reply_allowed("fedmq/v1/tasks/t1", "dev-1")
    assert not topics.reply_allowed("fedmq/v1/reply/dev-1x", "dev-1")
    assert not topics.reply_allowed("fedmq/v1/reply/dev-1/#", "dev-1")


def test_request_envelope_validation() -> None:
    ok = Request.from_wire({"id": "1", "reply_to": "r", "args": {"a": 1}}, method="m")
    assert ok.args == {"a": 1} and ok.deadline is None
    for body, message in [([1], "must be an object"), ({"reply_to": "r"}, "missing 'id'"),
                          ({"id": "1"}, "missing 'reply_to'"),
                          ({"id": "1", "reply_to": "r", "args": [1]}, "'args' must be an object"),
                          ({"id": "1", "reply_to": "r", "method": "other"}, "does not match"),
                          ({"id": "1", "reply_to": "r", "deadline": "soon"}, "'deadline'"),
                          ({"id": "1", "reply_to": "r", "junk": 1}, "unknown envelope fields"),
                          ({"id": 5, "reply_to": "r"}, "'id' must be a string")]:
        with pytest.raises(EnvelopeError, match=message):
            Request.from_wire(body, method="m")


def test_reply_envelope() -> None:
    assert Reply.from_wire({"id": "1", "ok": True, "result": 3}).raise_for_error() == 3
    with pytest.raises(EnvelopeError):
        Reply.from_wire({"id": "1", "ok": False})
