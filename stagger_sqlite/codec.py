"""Codecs: messages <-> bytes.

Storage sees only bytes; encoding happens in the caller's thread before any
transaction opens (so an unencodable message never holds the writer lock),
and decoding happens after the read transaction has ended.

The codec is not recorded in the file: the ``StaggerQueue`` that reads a
message decodes it with its own codec.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, List, Protocol, Union, runtime_checkable

import cbor2

from .errors import DecodeError, EncodeError


@runtime_checkable
class Codec(Protocol):
    """Anything with ``dumps(obj) -> bytes`` and ``loads(bytes) -> obj``."""

    def dumps(self, obj: Any) -> bytes: ...

    def loads(self, data: bytes) -> Any: ...


#: The nesting ``CborCodec.loads_again`` accepts: more than ``dumps`` can
#: write (its C encoder, without a recursion guard, runs out of stack first).
DEEPEST = 1 << 20


class CborCodec:
    """CBOR (RFC 8949) through cbor2; the default.

    Round-trips None, bool, int, float, str, bytes, list (tuples come back as
    lists), dict, timezone-aware datetime, date, Decimal, UUID and set. A naive
    datetime is refused rather than guessed at. Decoding never executes code:
    unknown tags come back as ``cbor2.CBORTag`` values.
    """

    name = "cbor"

    # cbor2's own functions, not wrappers: they run once per message.
    dumps = staticmethod(cbor2.dumps)
    loads = staticmethod(cbor2.loads)

    @staticmethod
    def loads_again(data: bytes) -> Any:
        """``loads`` without cbor2's limit of 400 nested containers (a guard
        against hostile input that ``dumps`` does not share): a message
        written however deep reads back. Only tried once ``loads`` failed,
        so the limit costs nothing on the way of every message."""
        return cbor2.loads(data, max_depth=DEEPEST)


class JsonCodec:
    """JSON values, UTF-8 encoded; NaN and infinities are refused (not JSON)."""

    name = "json"

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class RawCodec:
    """Bytes-like in, ``bytes`` out, unchanged."""

    name = "raw"

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, (bytes, bytearray, memoryview)):
            return bytes(obj)
        raise TypeError(f"the raw codec takes bytes-like messages, not {type(obj).__name__}")

    def loads(self, data: bytes) -> Any:
        return bytes(data)


_BY_NAME = {"cbor": CborCodec, "json": JsonCodec, "raw": RawCodec}

CodecArg = Union[str, Codec]


def resolve(codec: CodecArg) -> Codec:
    """Return the codec object for a name or a codec-like object.

    Raises:
        ValueError: an unknown name, or an object without ``dumps``/``loads``.
    """
    if isinstance(codec, str):
        try:
            return _BY_NAME[codec]()
        except KeyError:
            raise ValueError(f"unknown codec {codec!r}: use 'cbor', 'json', 'raw' or an object with dumps/loads") from None
    if callable(getattr(codec, "dumps", None)) and callable(getattr(codec, "loads", None)):
        return codec
    raise ValueError(f"codec must be 'cbor', 'json', 'raw' or an object with dumps() and loads(), not {codec!r}")


def encode(codec: Codec, msg: Any) -> bytes:
    """Encode one message.

    Raises:
        EncodeError: the codec failed, or did not return bytes.
    """
    try:
        data = codec.dumps(msg)
    except Exception as e:  # any failure of user or library code is an encode failure
        raise EncodeError(f"cannot encode message of type {type(msg).__name__}: {e}") from e
    return data if type(data) is bytes else _as_bytes(data)


def encode_many(codec: Codec, msgs: Iterable[Any]) -> List[bytes]:
    """``encode`` of every message, all or none (``write_many``'s path).

    One ``map`` over the codec's ``dumps`` and one check of the result
    types, not a call of ``encode`` a message: that call cost about 0.3 us
    of the 1.6 us a message of a 1,000 batch takes in all (issue 6, W2:
    0.80x then 0.93x raw apsw's bulk insert with cbor2). Only when ``dumps``
    raises does it go message by message, for ``encode``'s error about the
    one that fails.

    Raises:
        EncodeError: as ``encode``, for the first message that fails.
    """
    msgs = msgs if isinstance(msgs, (list, tuple)) else list(msgs)
    try:
        bodies = list(map(codec.dumps, msgs))
    except Exception:
        return [encode(codec, m) for m in msgs]
    if set(map(type, bodies)) - {bytes}:  # a codec of the user's may return others
        return [b if type(b) is bytes else _as_bytes(b) for b in bodies]
    return bodies


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    raise EncodeError(f"codec dumps() returned {type(data).__name__}, not bytes")


def decode(codec: Codec, data: bytes, seq: int, path: str = "") -> Any:
    """Decode the stored bytes of message ``seq``.

    Raises:
        DecodeError: naming the seqno (and the queue path).
    """
    try:
        return codec.loads(data)
    except Exception as e:
        again = getattr(codec, "loads_again", None)
        if again is not None:
            try:
                return again(data)
            except Exception:
                pass
        where = f" in {path}" if path else ""
        raise DecodeError(f"cannot decode message seq={seq}{where}: {type(e).__name__}: {e}", seq=seq) from e
