"""The scanner and the startup reader against simple references, on generated and mutated input.

The references and checks live in ``fuzz/targets.py`` and are shared with the long-running
driver ``fuzz/run.py`` (see docs/reliability.md); these are the CI-sized runs.
"""

from __future__ import annotations

import os
from typing import List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fuzz import run as fuzz_run
from fuzz.targets import (
    PropertyFailure,
    ScanCase,
    StartupCase,
    check_scan,
    check_startup,
    reference_scan,
)
from odissey.wire import messages as m
from odissey.wire.errors import ProtocolViolation
from odissey.wire.scanner import Event, Scanner, StartupMessage, StartupReader

KINDS = b"QSEPBDHXZCcdfpTNAKRv"
kind_st = st.one_of(st.sampled_from(list(KINDS)), st.integers(0, 255))
kinds_st = st.frozensets(kind_st, max_size=6)
cuts_st = st.lists(st.integers(min_value=0), max_size=8)
max_length_st = st.one_of(st.just(0x7FFFFFFF), st.integers(0, 300))
LENGTH_EDGES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
GSSENC_REQUEST = (8).to_bytes(4, "big") + m.GSSENC_REQUEST_CODE.to_bytes(4, "big")
STARTUP_EDGES = [0, 3, 4, 7, 8, 9, 12, 16, 10000, 10001, 10004, 0x7FFFFFFF, 0xFFFFFFFF]

# A mutation: (what, where, a byte, some bytes), applied by ``mutate``.
mutation_st = st.tuples(
    st.sampled_from(["flip", "set", "truncate", "delete", "insert", "duplicate", "length"]),
    st.integers(min_value=0),
    st.integers(0, 255),
    st.binary(min_size=1, max_size=8),
)


def mutate(data: bytes, heads: List[int], mutation: Tuple[str, int, int, bytes]) -> bytes:
    what, where, byte, extra = mutation
    if what == "length" and heads:
        at = heads[where % len(heads)] + 1
        value = LENGTH_EDGES[byte % len(LENGTH_EDGES)]
        return data[:at] + value.to_bytes(4, "big") + data[at + 4 :]
    if not data or what == "insert":
        at = where % (len(data) + 1)
        return data[:at] + extra + data[at:]
    at = where % len(data)
    if what == "flip":
        return data[:at] + bytes([data[at] ^ (1 << byte % 8)]) + data[at + 1 :]
    if what == "set":
        return data[:at] + bytes([byte]) + data[at + 1 :]
    if what == "truncate":
        return data[:at]
    if what == "delete":
        return data[:at] + data[at + len(extra) :]
    return data[: at + len(extra)] + data[at : at + len(extra)] + data[at + len(extra) :]


def cut(data: bytes, cuts: List[int]) -> Tuple[int, ...]:
    return tuple(sorted(c % (len(data) + 1) for c in cuts))


@st.composite
def framed(draw: st.DrawFn) -> Tuple[bytes, List[int]]:
    """Well-framed messages: the stream and where each header starts."""
    msgs = draw(
        st.lists(
            st.builds(lambda k, body: m.message(bytes([k]), body), kind_st, st.binary(max_size=40)),
            max_size=10,
        )
    )
    heads, pos = [], 0
    for msg in msgs:
        heads.append(pos)
        pos += len(msg)
    return b"".join(msgs), heads


@st.composite
def mutated_stream(draw: st.DrawFn) -> bytes:
    data, heads = draw(framed())
    for mutation in draw(st.lists(mutation_st, max_size=3)):
        data = mutate(data, heads, mutation)
    return data


@st.composite
def startup_stream(draw: st.DrawFn) -> bytes:
    """A client's first bytes: real packets of every kind, mutated, or plain garbage."""
    packet_st = st.one_of(
        st.builds(
            m.startup_message,
            st.dictionaries(st.sampled_from(["user", "database", "_pq_.x", "options"]),
                            st.sampled_from(["", "alice", "\u00e9"]), max_size=3),
            st.sampled_from([m.PROTOCOL_3_0, m.PROTOCOL_3_0 | 2, 2 << 16, 0x12345678]),
        ),
        st.just(m.ssl_request()),
        st.just(GSSENC_REQUEST),
        st.builds(m.cancel_request, st.integers(-(1 << 31), (1 << 31) - 1),
                  st.integers(-(1 << 31), (1 << 31) - 1)),
    )
    packets = draw(st.lists(packet_st, min_size=1, max_size=3))
    heads, pos = [], 0
    for packet in packets:
        heads.append(pos)
        pos += len(packet)
    data = b"".join(packets)
    for mutation in draw(st.lists(mutation_st, max_size=3)):
        what, where, byte, _ = mutation
        if what == "length":
            at = heads[where % len(heads)]
            value = STARTUP_EDGES[byte % len(STARTUP_EDGES)]
            data = data[:at] + value.to_bytes(4, "big") + data[at + 4 :]
        else:
            data = mutate(data, [], mutation)
    return draw(st.one_of(st.just(data), st.binary(max_size=60)))


class ScannerFuzzTests(SynchronousTestCase):
    @given(mutated_stream(), cuts_st, kinds_st, kinds_st, st.booleans(), max_length_st)
    @settings(max_examples=200, deadline=None)
    def test_matches_reference(
        self,
        data: bytes,
        cuts: List[int],
        watch: frozenset[int],
        collect: frozenset[int],
        collect_all: bool,
        max_length: int,
    ) -> None:
        """Any stream, chunking and options: the scanner matches the whole-stream reference."""
        check_scan(ScanCase(data, cut(data, cuts), watch, collect, collect_all, max_length))

    @given(
        framed(),
        st.integers(min_value=0),
        st.integers(min_value=0),
        st.integers(0, 20),
        cuts_st,
    )
    @settings(max_examples=150, deadline=None)
    def test_edge_lengths(
        self,
        stream: Tuple[bytes, List[int]],
        which: int,
        pick: int,
        slack: int,
        cuts: List[int],
    ) -> None:
        """A length field set to an edge value is refused exactly when below 4 or above max."""
        data, heads = stream
        if not heads:
            data, heads = m.sync(), [0]
        ends = heads[1:] + [len(data)]
        max_length = max(e - h - 1 for h, e in zip(heads, ends)) + slack
        at = heads[which % len(heads)]
        edges = LENGTH_EDGES + [max_length - 1, max_length, max_length + 1]
        value = edges[pick % len(edges)]
        data = data[: at + 1] + value.to_bytes(4, "big") + data[at + 5 :]
        outcome = check_scan(
            ScanCase(data, cut(data, cuts), collect_all=True, max_length=max_length)
        )
        if value < 4 or value > max_length:
            self.assertEqual(outcome, "violation")
            self.assertEqual(reference_scan(data, max_length)[1], at)

    @given(framed(), kind_st, st.sampled_from([0, 3, 0x7FFFFFFF]), st.binary(max_size=20),
           st.integers(min_value=0))
    @settings(max_examples=150, deadline=None)
    def test_violation_offset_points_at_bad_header(
        self,
        good: Tuple[bytes, List[int]],
        kind: int,
        length: int,
        after: bytes,
        split: int,
    ) -> None:
        """Split anywhere, the violation's offset plus its chunk's start is the bad header."""
        bad_at = len(good[0])
        data = good[0] + bytes([kind]) + length.to_bytes(4, "big") + after
        split %= len(data) + 1
        scanner = Scanner(collect_all=True, max_length=1000)
        base = 0
        with self.assertRaises(ProtocolViolation) as caught:
            scanner.feed(data[:split])
            base = split
            scanner.feed(data[split:])
        self.assertEqual(base + caught.exception.offset, bad_at)
        self.assertEqual(data[base + caught.exception.offset], kind)
        self.assertGreaterEqual(caught.exception.offset, -4)

    def test_oracle_catches_late_ends(self) -> None:
        """The reference check is not vacuous: ends reported one byte late are caught."""

        class LateEnds(Scanner):
            def feed(self, data: bytes) -> List[Event]:
                return [(k, b, end + 1) for k, b, end in super().feed(data)]

        case = ScanCase(m.sync() + m.query("x"), (3,), collect_all=True)
        self.assertEqual(check_scan(case), "ok")
        with self.assertRaises(PropertyFailure):
            check_scan(case, factory=LateEnds)


class StartupReaderFuzzTests(SynchronousTestCase):
    @given(startup_stream(), cuts_st)
    @settings(max_examples=200, deadline=None)
    def test_matches_reference(self, data: bytes, cuts: List[int]) -> None:
        """Any first bytes, any chunking: packets, need-more or only the codec's two errors."""
        check_startup(StartupCase(data, cut(data, cuts)))

    @given(
        st.dictionaries(
            st.one_of(
                st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1,
                         max_size=12),
                st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=6)
                .map(lambda s: "_pq_." + s),
            ),
            st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=30),
            max_size=6,
        ),
        st.integers(0, 0xFFFF),
        cuts_st,
    )
    @settings(max_examples=100, deadline=None)
    def test_parameters_round_trip(
        self, params: dict[str, str], minor: int, cuts: List[int]
    ) -> None:
        """Any UTF-8 parameters come back as sent; ``_pq_.`` names are listed, in order."""
        packet = m.startup_message(params, protocol=(3 << 16) | minor)
        reader = StartupReader()
        got = []
        bounds = [0, *cut(packet, cuts), len(packet)]
        for a, b in zip(bounds, bounds[1:]):
            result = reader.feed(packet[a:b])
            if result is not None:
                got.append(result)
        want = StartupMessage(
            minor,
            {k: v for k, v in params.items() if not k.startswith("_pq_.")},
            tuple(k for k in params if k.startswith("_pq_.")),
        )
        self.assertEqual(got, [want])
        self.assertEqual(reader.rest, b"")


class FuzzDriverTests(SynchronousTestCase):
    def test_fixed_seed_run(self) -> None:
        """The long-run driver's cases pass for a few thousand inputs of a fixed seed."""
        seed = int(os.environ.get("ODISSEY_FUZZ_SEED", "20240517"))
        print(f"fuzz/run.py seed={seed} (set ODISSEY_FUZZ_SEED to change)")
        counts, failures = fuzz_run.fuzz(seed, 4000)
        for failure in failures:
            fuzz_run.report_failure(seed, failure)
        self.assertEqual(failures, [])
        self.assertEqual(sum(counts.values()), 4000)
        for key in ("scan/ok", "scan/violation", "startup/ok", "startup/violation",
                    "startup/unsupported"):
            self.assertIn(key, counts)

    def test_cases_replay(self) -> None:
        """A case is a function of (seed, index) alone, so a failure replays from its report."""
        self.assertEqual(fuzz_run.make_case(99, 12345), fuzz_run.make_case(99, 12345))
        self.assertNotEqual(fuzz_run.make_case(99, 12345), fuzz_run.make_case(99, 12346))
