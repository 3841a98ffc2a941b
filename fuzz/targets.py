"""Fuzz targets for the wire codec: each runs one case and checks it against a reference.

A target feeds one byte stream, cut into chunks, to the real object and to a deliberately
simple reference that sees the whole stream at once, and raises :class:`PropertyFailure`
when they disagree or when the real object raises anything but the codec's own errors.

``check_scan``
    :class:`~odissey.wire.scanner.Scanner` with any ``watch``/``collect``/``collect_all``/
    ``max_length``: it raises only :class:`ProtocolViolation`, exactly when the reference
    finds a bad header, in the chunk that completes that header, with ``offset`` pointing
    at it; otherwise every chunk reports exactly the events whose report point (header end
    for watched messages, message end for collected ones) falls in that chunk, with the
    same type, body and absolute end, and ``in_message()`` after every chunk says where
    the reference says the stream stops.
``check_startup``
    :class:`~odissey.wire.scanner.StartupReader`, drained after every chunk: it yields the
    reference's packets in order, each in the chunk that completes it, raises only
    ``ProtocolViolation``/``UnsupportedProtocol`` (of the class the reference expects, in
    the chunk that decides it), and otherwise keeps the same ``rest``.

The references are written in another shape on purpose: the scanner's as one pass over
the whole stream, the startup parser's as the C-string walk of PostgreSQL's
``ProcessStartupPacket`` (postmaster.c / backend_startup.c).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, FrozenSet, List, Optional, Tuple, Type, Union

from odissey.wire.errors import PoolerError, ProtocolViolation, UnsupportedProtocol
from odissey.wire.messages import CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE
from odissey.wire import scanner as packets
from odissey.wire.scanner import Scanner, StartupPacket as Packet, StartupReader

MAX_STARTUP_LENGTH = 10004  # what PostgreSQL accepts as a whole startup packet, length included

ScannerFactory = Callable[..., Scanner]


class PropertyFailure(AssertionError):
    """The object under test disagreed with its reference (or raised a foreign error)."""


@dataclass(frozen=True)
class ScanCase:
    """One scanner input: a stream, where it is cut into chunks, and the scanner's options.

    ``cuts`` are sorted positions in ``0..len(data)``; a repeated cut feeds an empty chunk.
    """

    data: bytes
    cuts: Tuple[int, ...] = ()
    watch: FrozenSet[int] = frozenset()
    collect: FrozenSet[int] = frozenset()
    collect_all: bool = False
    max_length: int = 0x7FFFFFFF

    def describe(self) -> str:
        return (
            f"scan data={self.data.hex()} cuts={list(self.cuts)} "
            f"watch={bytes(sorted(self.watch))!r} collect={bytes(sorted(self.collect))!r} "
            f"collect_all={self.collect_all} max_length={self.max_length}"
        )


@dataclass(frozen=True)
class StartupCase:
    """One startup-reader input: the first bytes of a client connection, cut into chunks."""

    data: bytes
    cuts: Tuple[int, ...] = ()

    def describe(self) -> str:
        return f"startup data={self.data.hex()} cuts={list(self.cuts)}"


Case = Union[ScanCase, StartupCase]


def chunks(data: bytes, cuts: Tuple[int, ...]) -> List[Tuple[int, int]]:
    """``(start, end)`` of each chunk that ``cuts`` make of ``data``."""
    bounds = [0]
    bounds.extend(cuts)
    bounds.append(len(data))
    return [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


# -- the scanner ---------------------------------------------------------------------------

#: One message of the reference walk: (start, type, end); end is -1 when the stream stops
#: inside its 5-byte header.
RefMessage = Tuple[int, int, int]


def reference_scan(data: bytes, max_length: int) -> Tuple[List[RefMessage], Optional[int]]:
    """Walk the whole stream: its messages, and where the first bad header starts (or None).

    The last message may be incomplete (``end > len(data)``, or -1 for a cut header).
    """
    messages: List[RefMessage] = []
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < 5:
            messages.append((pos, data[pos], -1))
            break
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        if length < 4 or length > max_length:
            return messages, pos
        messages.append((pos, data[pos], pos + 1 + length))
        pos += 1 + length
    return messages, None


def _expected_events(
    data: bytes, messages: List[RefMessage], case: ScanCase
) -> List[Tuple[int, int, Optional[bytes], int]]:
    """``(report point, type, body or None, end)`` of what the scanner should report."""
    n = len(data)
    watch = case.watch | case.collect
    out: List[Tuple[int, int, Optional[bytes], int]] = []
    for start, kind, end in messages:
        if end < 0:
            continue
        if case.collect_all or kind in case.collect:
            if end <= n:
                out.append((end, kind, data[start + 5 : end], end))
        elif kind in watch:
            out.append((start + 5, kind, None, end))
    return out


def _expected_in_message(messages: List[RefMessage], p: int) -> Optional[Tuple[int, int]]:
    """Where a stream that stops after ``p`` bytes stops, per the reference."""
    for start, kind, end in messages:
        if start >= p:
            return None
        if end < 0 or p - start < 5:
            return kind, -1
        if p < end:
            return kind, end - p
    return None


def check_scan(case: ScanCase, factory: ScannerFactory = Scanner) -> str:
    """Run one scanner case; return ``"ok"`` or ``"violation"``, or raise PropertyFailure."""
    data = case.data
    messages, bad = reference_scan(data, case.max_length)
    expected = _expected_events(data, messages, case)
    stops = list(messages)
    if bad is not None:
        stops.append((bad, data[bad], -1))
    scanner = factory(
        case.watch, case.collect, collect_all=case.collect_all, max_length=case.max_length
    )
    i = 0
    for a, b in chunks(data, case.cuts):
        chunk = data[a:b]
        try:
            got = scanner.feed(chunk)
        except ProtocolViolation as exc:
            if bad is None or not a < bad + 5 <= b:
                raise PropertyFailure(
                    f"ProtocolViolation in chunk [{a}:{b}] where the reference "
                    f"{'finds none' if bad is None else f'has a bad header at {bad}'}: {exc}"
                ) from exc
            if a + exc.offset != bad:
                raise PropertyFailure(
                    f"ProtocolViolation offset {exc.offset} in chunk [{a}:{b}] points at "
                    f"{a + exc.offset}, the bad header is at {bad}"
                ) from exc
            if exc.sqlstate != "08P01":
                raise PropertyFailure(f"ProtocolViolation with SQLSTATE {exc.sqlstate}")
            return "violation"
        except Exception as exc:
            raise PropertyFailure(
                f"Scanner.feed raised {type(exc).__name__}: {exc} in chunk [{a}:{b}]"
            ) from exc
        if bad is not None and a < bad + 5 <= b:
            raise PropertyFailure(
                f"no ProtocolViolation in chunk [{a}:{b}] that completes the bad header at {bad}"
            )
        want = []
        while i < len(expected) and expected[i][0] <= b:
            _, kind, body, end = expected[i]
            want.append((kind, body, end))
            i += 1
        seen = []
        for event in got:
            kind, body, end = event
            if body is not None and type(body) is not bytes:
                raise PropertyFailure(f"event body is a {type(body).__name__}, not bytes")
            seen.append((kind, body, a + end))
        if seen != want:
            raise PropertyFailure(
                f"chunk [{a}:{b}] reported {seen} (absolute ends), the reference {want}"
            )
        state = scanner.in_message()
        if state != _expected_in_message(stops, b):
            raise PropertyFailure(
                f"in_message() after byte {b} is {state}, "
                f"the reference says {_expected_in_message(stops, b)}"
            )
    if i != len(expected):
        raise PropertyFailure(f"events never reported: {expected[i:]}")
    return "ok"


# -- the startup reader --------------------------------------------------------------------

Outcome = Union[Packet, Type[PoolerError]]


def reference_packet(body: bytes) -> Outcome:
    """A startup packet's body (after its length) -> packet, or the error class it earns."""
    code = int.from_bytes(body[:4], "big")
    if code == SSL_REQUEST_CODE:
        return packets.SSLRequest() if len(body) == 4 else ProtocolViolation
    if code == GSSENC_REQUEST_CODE:
        return packets.GSSENCRequest() if len(body) == 4 else ProtocolViolation
    if code == CANCEL_REQUEST_CODE:
        if len(body) != 12:
            return ProtocolViolation
        pid = int.from_bytes(body[4:8], "big", signed=True)
        secret = int.from_bytes(body[8:12], "big", signed=True)
        return packets.CancelRequest(pid, secret)
    if code >> 16 != 3:
        return UnsupportedProtocol
    # ProcessStartupPacket: name/value C strings until an empty name, which must be the
    # last byte. Odissey also insists on UTF-8.
    buf = body[4:]
    n = len(buf)
    params = {}
    unsupported = []
    offset = 0
    while offset < n:
        name_end = buf.find(b"\0", offset)
        if name_end == offset:
            break
        if name_end < 0 or name_end + 1 >= n:
            return ProtocolViolation
        value_end = buf.find(b"\0", name_end + 1)
        if value_end < 0:
            return ProtocolViolation
        try:
            name = buf[offset:name_end].decode("utf-8")
            value = buf[name_end + 1 : value_end].decode("utf-8")
        except UnicodeDecodeError:
            return ProtocolViolation
        if name.startswith("_pq_."):
            unsupported.append(name)
        else:
            params[name] = value
        offset = value_end + 1
    if offset != n - 1:
        return ProtocolViolation
    return packets.StartupMessage(code & 0xFFFF, params, tuple(unsupported))


def reference_startup(
    data: bytes,
) -> Tuple[List[Tuple[int, Packet]], Optional[Tuple[int, Type[PoolerError]]], bytes]:
    """The whole stream read packet after packet.

    Returns ``(completion point, packet)`` for each packet, then either ``(decision
    point, error class)`` or None, and the bytes left over when there was no error.
    """
    packets: List[Tuple[int, Packet]] = []
    pos, n = 0, len(data)
    while True:
        if n - pos < 4:
            return packets, None, data[pos:]
        length = int.from_bytes(data[pos : pos + 4], "big")
        if length < 8 or length > MAX_STARTUP_LENGTH:
            return packets, (pos + 4, ProtocolViolation), b""
        if n - pos < length:
            return packets, None, data[pos:]
        outcome = reference_packet(data[pos + 4 : pos + length])
        if isinstance(outcome, type):
            return packets, (pos + length, outcome), b""
        packets.append((pos + length, outcome))
        pos += length


_SQLSTATES = {ProtocolViolation: "08P01", UnsupportedProtocol: "0A000"}


def check_startup(case: StartupCase) -> str:
    """Run one startup case; return ``"ok"``, ``"violation"`` or ``"unsupported"``."""
    data = case.data
    packets, error, rest = reference_startup(data)
    reader = StartupReader()
    i = 0
    for a, b in chunks(data, case.cuts):
        got = []
        try:
            packet = reader.feed(data[a:b])
            while packet is not None:
                got.append(packet)
                packet = reader.feed(b"")
        except PoolerError as exc:
            if error is None or not a < error[0] <= b:
                raise PropertyFailure(
                    f"{type(exc).__name__} in chunk [{a}:{b}] where the reference "
                    f"{'finds none' if error is None else f'decides {error}'}: {exc}"
                ) from exc
            if type(exc) is not error[1]:
                raise PropertyFailure(f"{type(exc).__name__}, the reference {error[1].__name__}")
            if exc.sqlstate != _SQLSTATES[error[1]]:
                raise PropertyFailure(f"{exc!r} has SQLSTATE {exc.sqlstate}")
            want = [p for at, p in packets[i:] if at <= b]
            if got != want:
                raise PropertyFailure(f"before the error chunk [{a}:{b}] gave {got}, want {want}")
            return "violation" if error[1] is ProtocolViolation else "unsupported"
        except Exception as exc:
            raise PropertyFailure(
                f"StartupReader.feed raised {type(exc).__name__}: {exc} in chunk [{a}:{b}]"
            ) from exc
        if error is not None and a < error[0] <= b:
            raise PropertyFailure(f"no {error[1].__name__} in chunk [{a}:{b}]: {error}")
        want = []
        while i < len(packets) and packets[i][0] <= b:
            want.append(packets[i][1])
            i += 1
        if got != want:
            raise PropertyFailure(f"chunk [{a}:{b}] gave {got}, the reference {want}")
    if reader.rest != rest:
        raise PropertyFailure(f"rest is {reader.rest!r}, the reference {rest!r}")
    return "ok"


def check(case: Case) -> str:
    """Run any case through its target."""
    if isinstance(case, ScanCase):
        return check_scan(case)
    return check_startup(case)
