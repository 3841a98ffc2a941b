"""Message boundaries of a v3 stream, found without copying the stream.

The relay forwards every chunk exactly as it arrived; the :class:`Scanner` walks the
message headers in that chunk and reports only the messages the caller watches, carrying
"bytes left in the current message" across chunk boundaries. The :class:`StartupReader`
reads the untyped first packet of a client connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Union

from odissey.wire.errors import ProtocolViolation, UnsupportedProtocol
from odissey.wire.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    SSL_REQUEST_CODE,
)

_U32 = struct.Struct("!I").unpack_from
#: A message header: type byte and length, in one call (raises struct.error when fewer
#: than five bytes are left).
HEADER = struct.Struct("!BI").unpack_from
_HEADER = HEADER
_2I32 = struct.Struct("!ii").unpack_from
_Z = ord("Z")
_EVERY_TYPE = frozenset(range(256))

#: One reported message: (type byte, body or None when not collected, end offset).
#: ``end`` is where the message ends relative to the start of the chunk just fed; it can
#: lie beyond that chunk when a watched message is reported from its header alone.
Event = tuple[int, "bytes | None", int]

#: PostgreSQL's MAX_STARTUP_PACKET_LENGTH, which it compares with the length less the
#: four bytes of the length itself.
MAX_STARTUP_PACKET = 10000


class Scanner:
    """Incremental walker over typed messages (1-byte type, Int32 length, body).

    ``watch`` types are reported as soon as their header is seen; ``collect`` types (a
    subset of what is reported) are reported once their whole body has arrived, with the
    body. With ``collect_all`` every message is reported with its body (login phases).
    A declared length below 4 or above ``max_length`` raises :class:`ProtocolViolation`,
    and so does, when ``strict``, a type that is neither watched nor collected (the
    caller watches every type the peer may send, as PostgreSQL knows them).
    """

    __slots__ = (
        "watch", "collect", "collect_all", "max_length", "strict",
        "_skip", "_skip_type", "_head", "_body", "_body_type", "_body_need",
    )

    def __init__(
        self,
        watch: frozenset[int] = frozenset(),
        collect: frozenset[int] = frozenset(),
        *,
        collect_all: bool = False,
        max_length: int = 0x7FFFFFFF,
        strict: bool = False,
    ) -> None:
        if collect_all:
            collect = _EVERY_TYPE
        self.watch = watch | collect
        self.collect = collect
        self.collect_all = collect_all
        self.max_length = max_length
        self.strict = strict
        self._skip = 0
        self._skip_type = 0
        self._head = b""
        self._body: bytearray | None = None
        self._body_type = 0
        self._body_need = 0

    def in_message(self) -> tuple[int, int] | None:
        """``(type, bytes still missing)`` when the stream stops inside a message.

        The count is -1 when even the header is incomplete.
        """
        if self._skip:
            return self._skip_type, self._skip
        if self._body is not None:
            return self._body_type, self._body_need
        if self._head:
            return self._head[0], -1
        return None

    def kept(self) -> int:
        """How many bytes of an incomplete header or collected message have been fed so far
        (0 when the stream stops between messages or inside a message only skipped)."""
        if self._body is not None:
            return 5 + len(self._body)
        return len(self._head)

    def between(self) -> bool:
        """The stream stopped between two messages: the next chunk starts with a header."""
        return not (self._skip or self._head or self._body is not None)

    def whole(self, data: bytes) -> bool:
        """The chunk is exactly one whole message of valid length, starting where the
        last one ended: what :meth:`feed` would report of it is then known without
        feeding it, and feeding it would change nothing."""
        if self._skip or self._head or self._body is not None:
            return False
        try:
            length = _U32(data, 1)[0]
        except struct.error:  # not even a header
            return False
        return length + 1 == len(data) and 4 <= length <= self.max_length

    def complete(self, data: bytes) -> bool:
        """The chunk is whole messages of valid lengths (and, when ``strict``, watched
        types), starting where the last one ended: :meth:`feed` would raise nothing
        and leave the scanner as it is, so the chunk can be checked now and scanned,
        from between two messages, later. False when anything is cut or wrong (feed
        it to hear what)."""
        if self._skip or self._head or self._body is not None:
            return False
        n = len(data)
        pos = 0
        max_length = self.max_length
        types = self.watch if self.strict else _EVERY_TYPE
        try:  # (a header cut short raises struct.error)
            while pos < n:
                kind, length = _HEADER(data, pos)
                if length < 4 or length > max_length or kind not in types:
                    return False
                pos += 1 + length
        except struct.error:
            return False
        return pos == n

    def ready_for_query(self, data: bytes, stops: dict[int, frozenset[int] | None]) -> int:
        """The one pass of a server chunk that needs no events: how many ReadyForQuery
        it holds, when it ends exactly after one (a reply's usual read) and holds no
        message the caller must see (``stops``: its type, with ``None`` or the set of
        length fields that matter; ``Z`` itself must be in it, with None). -1 otherwise,
        or when the scanner carries more than the rest of a message it was skipping:
        nothing has changed then, and the caller feeds the chunk instead. Bad lengths
        also answer -1, for :meth:`feed` to raise (this scanner's ``max_length`` is
        taken to exceed any chunk: a server's is unlimited)."""
        if self._head or self._body is not None:
            return -1
        n = len(data)
        pos = self._skip
        count = 0
        kind = length = 0
        try:  # (a header cut short raises struct.error: cheaper than checking each one)
            while pos < n:
                kind, length = _HEADER(data, pos)
                if length < 4:
                    return -1
                pos += 1 + length
                if kind in stops:  # the only test most messages see
                    if kind == _Z:
                        count += 1
                        continue
                    lengths = stops[kind]
                    if lengths is None or length in lengths:
                        return -1
        except struct.error:
            return -1
        # (a length past max_length ends beyond the chunk: pos != n)
        if pos != n or kind != _Z or length != 5:
            return -1
        self._skip = 0
        return count

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        n = len(data)
        pos = 0
        shift = 0
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                return events
            pos = self._skip
            self._skip = 0
        elif self._body is not None:
            need = self._body_need
            if need > n:
                self._body += data
                self._body_need = need - n
                return events
            self._body += data[:need]
            events.append((self._body_type, bytes(self._body), need))
            self._body = None
            pos = need
        elif self._head:
            shift = len(self._head)
            data = self._head + data
            n = len(data)
            self._head = b""
        watch = self.watch
        collect = self.collect
        max_length = self.max_length
        try:  # (a header cut short raises struct.error: cheaper than checking each one)
            while pos < n:
                kind, length = _HEADER(data, pos)
                if length < 4 or length > max_length:
                    raise ProtocolViolation(
                        f"invalid message length {length} for message type {chr(kind)!r}",
                        pos - shift,
                    )
                end = pos + 1 + length
                if kind in collect:
                    if end <= n:
                        events.append((kind, data[pos + 5 : end], end - shift))
                        pos = end
                        continue
                    self._body = bytearray(data[pos + 5 :])
                    self._body_type = kind
                    self._body_need = end - n
                    break
                if kind in watch:
                    events.append((kind, None, end - shift))
                elif self.strict:
                    raise ProtocolViolation(f"invalid frontend message type {kind}", pos - shift)
                if end > n:
                    self._skip = end - n
                    self._skip_type = kind
                    break
                pos = end
        except struct.error:
            self._head = data[pos:]
        return events


@dataclass(frozen=True)
class StartupMessage:
    """A StartupMessage; ``unsupported`` lists ``_pq_.`` options we must refuse by name."""

    minor: int
    params: dict[str, str]
    unsupported: tuple[str, ...] = ()


@dataclass(frozen=True)
class SSLRequest:
    pass


@dataclass(frozen=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True)
class CancelRequest:
    pid: int
    secret: int


StartupPacket = Union[StartupMessage, SSLRequest, GSSENCRequest, CancelRequest]


@dataclass
class StartupReader:
    """Reads the untyped first packet(s) of a client connection.

    ``feed`` returns a packet once one is complete; bytes after it stay in ``rest`` so
    that a caller can check, for example, that nothing followed an SSLRequest.
    """

    rest: bytes = field(default=b"")

    def feed(self, data: bytes) -> StartupPacket | None:
        buf = self.rest + data
        if len(buf) < 4:
            self.rest = buf
            return None
        (length,) = _U32(buf, 0)
        if length < 8 or length - 4 > MAX_STARTUP_PACKET:
            raise ProtocolViolation(f"invalid length of startup packet: {length}")
        if len(buf) < length:
            self.rest = buf
            return None
        self.rest = buf[length:]
        return parse_startup_packet(buf[4:length])


def parse_startup_packet(body: bytes) -> StartupPacket:
    """Body of an untyped startup packet (after its length) -> packet."""
    if len(body) < 4:
        raise ProtocolViolation("invalid length of startup packet")
    (code,) = _U32(body, 0)
    if code == SSL_REQUEST_CODE:
        if len(body) != 4:
            raise ProtocolViolation("invalid length of SSLRequest packet")
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        if len(body) != 4:
            raise ProtocolViolation("invalid length of GSSENCRequest packet")
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(body) != 12:
            raise ProtocolViolation("invalid length of CancelRequest packet")
        pid, secret = _2I32(body, 4)
        return CancelRequest(pid, secret)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise UnsupportedProtocol(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
        )
    return _parse_startup_params(minor, body[4:])


def _parse_startup_params(minor: int, data: bytes) -> StartupMessage:
    if not data.endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    pairs = data[:-1]
    if pairs and not pairs.endswith(b"\0"):
        raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
    try:  # (decoded whole: one call, not two per pair)
        parts = pairs[:-1].decode().split("\0") if pairs else []
    except UnicodeDecodeError:
        raise ProtocolViolation("invalid startup packet: parameter is not valid UTF-8") from None
    if len(parts) % 2:
        raise ProtocolViolation("invalid startup packet layout: parameter without value")
    params: dict[str, str] = {}
    unsupported: list[str] = []
    for key, value in zip(parts[::2], parts[1::2]):
        if not key:
            raise ProtocolViolation("invalid startup packet layout: empty parameter name")
        if key.startswith("_pq_."):
            unsupported.append(key)
        else:
            params[key] = value
    return StartupMessage(minor, params, tuple(unsupported))
