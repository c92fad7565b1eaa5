"""Codecs (SPEC §2): what round-trips, what is refused, and that a refused
message writes nothing."""

import datetime
import decimal
import json
import pickle
import uuid

import pytest

from stagger_sqlite import DecodeError, EncodeError, StaggerQueue

UTC = datetime.timezone.utc
CBOR_VALUES = [
    None,
    True,
    False,
    0,
    -1,
    2**64 + 5,  # bignum
    -(2**70),
    1.5,
    float("inf"),
    "",
    "héllo ✓",
    b"",
    b"\x00\xff" * 100,
    [],
    [1, "a", None],
    {},
    {"a": 1, 2: "b"},
    datetime.datetime(2026, 11, 22, 5, 30, 1, 123456, tzinfo=UTC),
    datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
    datetime.date(2026, 2, 28),
    decimal.Decimal("12345.678901234567890"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    {1, 2, 3},
    {"nested": [{"deep": [1, {2, 3}, decimal.Decimal("0.1")]}, {"when": datetime.date(2000, 1, 1)}], "b": b"\x01"},
]


@pytest.fixture
def q(qpath):
    with StaggerQueue(qpath) as q:
        yield q


def test_cbor_is_the_default_and_round_trips_every_spec_type(q):
    seqs = q.write_many(CBOR_VALUES)
    got = [m for _, m in q.consume(wait=False)]
    assert got == CBOR_VALUES
    assert [type(m) for m in got] == [type(v) for v in CBOR_VALUES]
    assert seqs == list(range(1, len(CBOR_VALUES) + 1))


def test_cbor_nan_round_trips(q):
    q.write(float("nan"))
    (_, m), = q.consume(wait=False)
    assert m != m


def test_cbor_tuple_comes_back_as_list(q):
    q.write((1, (2, 3)))
    assert list(q.consume(wait=False)) == [(1, [1, [2, 3]])]


def test_cbor_naive_datetime_is_an_encode_error_and_writes_nothing(q):
    with pytest.raises(EncodeError, match="datetime") as e:
        q.write(datetime.datetime(2026, 1, 1, 12, 0))
    assert isinstance(e.value, TypeError)
    assert q.last_seq == 0 and len(q) == 0


@pytest.mark.parametrize("value", [object(), lambda: 1, {"k": object()}, [1, 2, object()]])
def test_cbor_unencodable_values_are_encode_errors(q, value):
    with pytest.raises(EncodeError):
        q.write(value)
    assert q.last_seq == 0


def test_a_message_nested_deeper_than_cbor2_reads_by_default_reads_back(q):
    """cbor2 writes containers nested any depth its stack allows but reads
    only 400 by default: every message written must read back."""
    deep = inner = []
    for _ in range(600):
        inner.append([])
        inner = inner[0]
    q.write_many([deep, "after"])
    assert [m for _, m in q.consume(wait=False)] == [deep, "after"]
    with q.consume(group="g", wait=False) as c:
        assert [m for _, m in c] == [deep, "after"]


def test_a_failing_write_many_writes_none_of_its_batch(q):
    q.write("before")
    with pytest.raises(EncodeError):
        q.write_many(["a", "b", object(), "d"])
    assert q.last_seq == 1
    assert len(q) == 1
    assert q.write("after") == 2


def test_a_generator_raising_inside_write_many_writes_nothing(q):
    def gen():
        yield 1
        yield 2
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError):
        q.write_many(gen())
    assert q.last_seq == 0


def test_decoding_never_executes_code(qpath):
    """A pickle payload stored raw is not unpickled by any codec."""

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('code ran')",))

    payload = pickle.dumps(Evil())
    with StaggerQueue(qpath, codec="raw") as raw:
        raw.write(payload)
    for codec in ("cbor", "json"):
        with StaggerQueue(qpath, codec=codec) as q:
            try:  # garbage to these codecs: data or a DecodeError, never a call
                list(q.consume(wait=False))
            except DecodeError as e:
                assert e.seq == 1
    # An unknown CBOR tag comes back as data, never as a constructed object.
    import cbor2

    with StaggerQueue(qpath, codec="raw") as raw:
        raw.write(cbor2.dumps(cbor2.CBORTag(9999, [1, 2])))
    with StaggerQueue(qpath) as q:
        (_, m), = q.consume(ack=1, wait=False)
        assert isinstance(m, cbor2.CBORTag) and m.tag == 9999 and list(m.value) == [1, 2]


def test_json_codec(qpath):
    values = [None, True, 1, 2.5, "x", [1, [2]], {"a": {"b": [None]}}]
    with StaggerQueue(qpath, codec="json") as q:
        q.write_many(values)
        q.write((1, 2))
        assert [m for _, m in q.consume(wait=False)] == values + [[1, 2]]
        for bad in (b"bytes", {1, 2}, float("nan"), datetime.date.today(), object()):
            with pytest.raises(EncodeError):
                q.write(bad)
        assert q.last_seq == len(values) + 1
    with StaggerQueue(qpath, codec="raw") as raw:  # stored as UTF-8 JSON text
        _, body = next(raw.consume(ack=6, wait=False))
        assert json.loads(body) == {"a": {"b": [None]}}


def test_raw_codec(qpath):
    with StaggerQueue(qpath, codec="raw") as q:
        q.write(b"abc")
        q.write(bytearray(b"\x00\x01"))
        q.write(memoryview(b"mv"))
        q.write(b"")
        got = [m for _, m in q.consume(wait=False)]
        assert got == [b"abc", b"\x00\x01", b"mv", b""]
        assert all(type(m) is bytes for m in got)
        for bad in ("text", 1, None, [b"a"]):
            with pytest.raises(EncodeError):
                q.write(bad)
        assert q.last_seq == 4


def test_the_codec_is_not_stored_in_the_file(qpath):
    with StaggerQueue(qpath, codec="json") as q:
        q.write({"a": 1})
    with StaggerQueue(qpath, codec="raw") as q:
        assert [m for _, m in q.consume(wait=False)] == [b'{"a":1}']
    with StaggerQueue(qpath) as q:  # cbor cannot read JSON text
        with pytest.raises(DecodeError) as e:
            list(q.consume(wait=False))
        assert e.value.seq == 1


class ReverseCodec:
    """A custom codec: any object with dumps/loads."""

    def dumps(self, obj):
        return obj[::-1].encode()

    def loads(self, data):
        return data.decode()[::-1]


def test_custom_codec_object(qpath):
    with StaggerQueue(qpath, codec=ReverseCodec()) as q:
        q.write("hello")
        assert list(q.consume(wait=False)) == [(1, "hello")]
        with pytest.raises(EncodeError):
            q.write(5)  # its dumps raises: an EncodeError, nothing written
        assert q.last_seq == 1
    with StaggerQueue(qpath, codec="raw") as raw:
        assert [m for _, m in raw.consume(wait=False)] == [b"olleh"]


class NotBytes:
    def dumps(self, obj):
        return str(obj)

    def loads(self, data):
        return data


class ByteArrayCodec:
    def dumps(self, obj):
        return bytearray(obj, "utf-8")

    def loads(self, data):
        return data


def test_custom_codec_must_return_bytes(qpath):
    with StaggerQueue(qpath, codec=NotBytes()) as q:
        with pytest.raises(EncodeError, match="bytes"):
            q.write("x")
        assert q.last_seq == 0
    with StaggerQueue(qpath, codec=ByteArrayCodec()) as q:
        q.write("x")
        assert list(q.consume(wait=False)) == [(1, b"x")]


class OddOneOut:
    """Returns bytes for every message but one (write_many checks them all)."""

    def dumps(self, obj):
        return str(obj) if obj == "odd" else memoryview(obj.encode())

    def loads(self, data):
        return data


def test_write_many_checks_what_a_custom_codec_returns(qpath):
    with StaggerQueue(qpath, codec=NotBytes()) as q:
        with pytest.raises(EncodeError, match="str, not bytes"):
            q.write_many(["a", "b"])
        assert q.last_seq == 0
    with StaggerQueue(qpath, codec=OddOneOut()) as q:
        with pytest.raises(EncodeError, match="str, not bytes"):
            q.write_many(["a", "odd", "c"])
        assert q.last_seq == 0
        assert q.write_many(iter(["a", "b"])) == [1, 2]  # memoryviews stored as bytes
        assert list(q.consume(wait=False)) == [(1, b"a"), (2, b"b")]


def test_write_many_names_the_type_that_cannot_be_encoded(q):
    with pytest.raises(EncodeError, match="type object"):
        q.write_many(["a", object(), "c"])
    assert q.last_seq == 0


class HalfCodec:
    def dumps(self, obj):
        return b""


@pytest.mark.parametrize("bad", ["pickle", "CBOR", "", None, 3, HalfCodec(), object()])
def test_bad_codec_is_a_value_error(qpath, bad):
    with pytest.raises(ValueError, match="codec"):
        StaggerQueue(qpath, codec=bad)
