"""The message scanner and the startup-packet reader, bytes in, values out."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from odissey.wire import messages as m
from odissey.wire.errors import PoolerError, ProtocolViolation, UnsupportedProtocol
from odissey.wire.scanner import (
    CancelRequest,
    GSSENCRequest,
    Scanner,
    SSLRequest,
    StartupMessage,
    StartupReader,
)

TYPES = b"QSEPBDHXZCcdfpTNA"

message_st = st.builds(
    lambda kind, body: m.message(bytes([kind]), body),
    st.sampled_from(list(TYPES)),
    st.binary(max_size=40),
)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for p in points:
        chunks.append(data[last:p])
        last = p
    chunks.append(data[last:])
    return chunks


def scan_all(scanner: Scanner, chunks: list[bytes]) -> list[tuple[int, bytes | None]]:
    out: list[tuple[int, bytes | None]] = []
    for chunk in chunks:
        out.extend((kind, body) for kind, body, _ in scanner.feed(chunk))
    return out


class ScannerTests(SynchronousTestCase):
    def test_reports_collected_bodies(self) -> None:
        """A collected message comes back with its body and where it ends."""
        data = m.query("select 1") + m.ready_for_query(b"T")
        events = Scanner(collect=frozenset(b"Z")).feed(data)
        self.assertEqual(events, [(ord("Z"), b"T", len(data))])

    def test_watched_reported_from_header(self) -> None:
        """A watched message is reported as soon as its header is in, before its body."""
        data = m.query("select 42")
        scanner = Scanner(watch=frozenset(b"Q"))
        self.assertEqual(scanner.feed(data[:6]), [(ord("Q"), None, len(data))])
        self.assertEqual(scanner.feed(data[6:]), [])
        self.assertIsNone(scanner.in_message())

    def test_in_message_after_partial(self) -> None:
        """The scanner says which message a chunk stopped inside and how much is missing."""
        data = m.message(b"d", b"x" * 100)
        scanner = Scanner()
        scanner.feed(data[:30])
        self.assertEqual(scanner.in_message(), (ord("d"), len(data) - 30))

    def test_split_header(self) -> None:
        """A header split over chunks is reassembled, with ends measured from the new chunk."""
        data = m.ready_for_query(b"E")
        scanner = Scanner(collect=frozenset(b"Z"))
        self.assertEqual(scanner.feed(data[:2]), [])
        self.assertEqual(scanner.feed(data[2:]), [(ord("Z"), b"E", len(data) - 2)])

    def test_length_too_small(self) -> None:
        """A declared length below 4 is a protocol violation located at its header."""
        data = m.sync() + b"Q" + struct.pack("!i", 3)
        with self.assertRaises(ProtocolViolation) as caught:
            Scanner().feed(data)
        self.assertEqual(caught.exception.offset, 5)

    def test_length_over_maximum(self) -> None:
        """A 2 GB declared length is refused before any of it is read."""
        data = b"Q" + struct.pack("!I", 0x7FFFFFF0)
        with self.assertRaises(ProtocolViolation):
            Scanner(max_length=1 << 20).feed(data)

    @given(st.lists(message_st, max_size=12), st.lists(st.integers(min_value=0), max_size=8))
    @settings(max_examples=300)
    def test_any_split_same_messages(self, msgs: list[bytes], cuts: list[int]) -> None:
        """Any split of a valid stream yields the same messages as the whole stream."""
        data = b"".join(msgs)
        whole = scan_all(Scanner(collect_all=True), [data])
        self.assertEqual(whole, [(mm[0], mm[5:]) for mm in msgs])
        self.assertEqual(scan_all(Scanner(collect_all=True), splits(data, cuts)), whole)
        watch = Scanner(watch=frozenset(b"QS"), collect=frozenset(b"Z"))
        want = [
            (k, b if k == ord("Z") else None) for k, b in whole if k in frozenset(b"QSZ")
        ]
        self.assertEqual(scan_all(watch, splits(data, cuts)), want)

    @given(st.lists(message_st, max_size=8), st.lists(st.integers(min_value=0), max_size=6))
    def test_end_offsets_point_past_message(self, msgs: list[bytes], cuts: list[int]) -> None:
        """Each reported end, added to the chunk's position, is where the message ends."""
        data = b"".join(msgs)
        ends, pos = [], 0
        for mm in msgs:
            pos += len(mm)
            ends.append(pos)
        scanner = Scanner(collect_all=True)
        seen: list[int] = []
        base = 0
        for chunk in splits(data, cuts):
            seen.extend(base + end for _, _, end in scanner.feed(chunk))
            base += len(chunk)
        self.assertEqual(seen, ends)

    @given(st.binary(max_size=200), st.lists(st.integers(min_value=0), max_size=5))
    @settings(max_examples=300)
    def test_garbage_raises_only_codec_error(self, data: bytes, cuts: list[int]) -> None:
        """Garbage never raises anything but the codec's own error type."""
        scanner = Scanner(collect_all=True, max_length=1000)
        try:
            for chunk in splits(data, cuts):
                scanner.feed(chunk)
        except ProtocolViolation:
            pass


class StartupReaderTests(SynchronousTestCase):
    def test_startup_message(self) -> None:
        """A StartupMessage comes back with its parameters."""
        packet = m.startup_message({"user": "alice", "database": "db"})
        self.assertEqual(
            StartupReader().feed(packet),
            StartupMessage(0, {"user": "alice", "database": "db"}),
        )

    def test_startup_in_pieces(self) -> None:
        """The packet may arrive one byte at a time."""
        packet = m.startup_message({"user": "bob"})
        reader = StartupReader()
        for byte in packet[:-1]:
            self.assertIsNone(reader.feed(bytes([byte])))
        self.assertEqual(reader.feed(packet[-1:]), StartupMessage(0, {"user": "bob"}))

    def test_ssl_request_and_rest(self) -> None:
        """Bytes after an SSLRequest stay in ``rest`` for the caller to judge."""
        reader = StartupReader()
        self.assertEqual(reader.feed(m.ssl_request() + b"xyz"), SSLRequest())
        self.assertEqual(reader.rest, b"xyz")

    def test_gssenc_and_cancel(self) -> None:
        """GSSENCRequest and CancelRequest are recognised by their codes."""
        self.assertEqual(StartupReader().feed(struct.pack("!ii", 8, 80877104)), GSSENCRequest())
        self.assertEqual(StartupReader().feed(m.cancel_request(7, -9)), CancelRequest(7, -9))

    def test_protocol_2_refused(self) -> None:
        """Protocol 2.0 gets the 0A000 refusal PostgreSQL gives."""
        packet = struct.pack("!ii", 9, 2 << 16) + b"\0"
        with self.assertRaises(UnsupportedProtocol) as caught:
            StartupReader().feed(packet)
        self.assertEqual(caught.exception.sqlstate, "0A000")

    def test_newer_minor_and_pq_options(self) -> None:
        """A 3.2 request is read as such; ``_pq_.`` options are listed as unsupported."""
        packet = m.startup_message({"user": "u", "_pq_.x": "1"}, protocol=(3 << 16) | 2)
        self.assertEqual(
            StartupReader().feed(packet), StartupMessage(2, {"user": "u"}, ("_pq_.x",))
        )

    def test_bad_lengths(self) -> None:
        """Lengths under 8 or over 10004 (PostgreSQL's 10000, plus the length itself) are
        protocol violations."""
        for length in (4, 7, 10005, 0x7FFFFFFF):
            with self.assertRaises(ProtocolViolation):
                StartupReader().feed(struct.pack("!i", length) + b"\0" * 8)

    def test_unterminated_params(self) -> None:
        """A parameter list without its final NUL is refused."""
        body = struct.pack("!i", 196608) + b"user\0x"
        with self.assertRaises(ProtocolViolation):
            StartupReader().feed(struct.pack("!i", len(body) + 4) + body)

    @given(st.binary(max_size=120))
    @settings(max_examples=300)
    def test_garbage_startup(self, data: bytes) -> None:
        """Garbage as a first packet raises only the codec's errors."""
        try:
            StartupReader().feed(data)
        except PoolerError:
            pass


class StrictTests(SynchronousTestCase):
    def test_unknown_type_refused_when_strict(self) -> None:
        """A strict scanner refuses a type nobody watches, pointing at its header."""
        data = m.query("select 1") + m.message(b"z")
        with self.assertRaises(ProtocolViolation) as caught:
            Scanner(watch=frozenset(b"Q"), strict=True).feed(data)
        self.assertEqual(caught.exception.offset, len(m.query("select 1")))
        self.assertEqual(len(Scanner(watch=frozenset(b"Q")).feed(data)), 1)  # not strict: skipped


class CompleteTests(SynchronousTestCase):
    """``Scanner.complete``: the check that lets a waiting chunk skip the scan."""

    @given(st.lists(st.one_of(message_st, st.binary(max_size=12)), max_size=6),
           st.integers(min_value=4, max_value=60))
    @settings(max_examples=400)
    def test_agrees_with_feed(self, parts: list[bytes], max_length: int) -> None:
        """True exactly when a strict scanner fed the chunk from between two messages
        raises nothing and ends between two messages again."""
        data = b"".join(parts)
        scanner = Scanner(watch=frozenset(b"QSPBDE"), max_length=max_length, strict=True)
        complete = scanner.complete(data)
        try:
            scanner.feed(data)
            fed = scanner.between()
        except ProtocolViolation:
            fed = False
        self.assertEqual(complete, fed)

    def test_false_inside_a_message(self) -> None:
        """After a chunk that stopped inside a message, nothing is complete: the next
        chunk starts with that message's rest, not a header."""
        scanner = Scanner(watch=frozenset(b"QS"), strict=True)
        scanner.feed(m.query("select 1")[:3])
        self.assertFalse(scanner.complete(m.sync()))
        self.assertTrue(Scanner(watch=frozenset(b"QS"), strict=True).complete(m.sync() + m.query("x")))
        for collect in (frozenset(), frozenset(b"Q")):  # inside a message skipped, or collected
            scanner = Scanner(watch=frozenset(b"QS"), collect=collect, strict=True)
            scanner.feed(m.message(b"Q", m.sync())[:5])
            self.assertFalse(scanner.complete(m.sync()))
