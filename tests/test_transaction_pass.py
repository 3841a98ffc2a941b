"""The one-pass paths against the simple one (Scanner.feed, then the tracker's matching
of the events) on random chunkings of random request and reply streams: server chunks
matched by Transaction.replies with Scanner.ready_for_query, client chunks that are
one whole Query queued by Transaction.query after Scanner.whole, and batches of whole
requests queued by Transaction.batch. The same answers, the
same tracker and scanner state after every chunk. Hypothesis prints the failing example
and the blob to replay it."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from odissey.server import SERVER_COLLECT
from odissey.transaction import CLIENT_WATCH, SERVER_WATCH, Transaction
from odissey.wire import messages as m
from odissey.wire.errors import ProtocolViolation
from odissey.wire.scanner import Scanner

#: What a client sends (a CopyData now and then, a Flush), weighted towards requests.
CLIENT_KINDS = b"QQQPBDESSFHCdcf"
#: Server replies, from the usual to the rare; bodies chosen per type below.
SERVER_KINDS = b"ZZZTDDCCCInst123EGSNA"
TAGS = (b"SELECT 1\0", b"DISCARD ALL\0", b"DEALLOCATE ALL\0", b"DELETE 1234\0", b"BEGIN\0")


def client_message(kind: int, body: bytes) -> bytes:
    if kind == 0:  # a Sync with a body: PostgreSQL refuses it
        return m.message(b"S", body or b"x")
    if kind in b"SHc":
        body = b""
    return m.message(bytes([kind]), body)


#: Bodies: short ones, and ones either side of what PostgreSQL reads of a small message.
body_st = st.one_of(st.binary(max_size=6), st.sampled_from([b"x" * 9995, b"x" * 9996]))


@st.composite
def server_message(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(list(SERVER_KINDS)))
    if kind == ord("Z"):
        body = draw(st.sampled_from([b"I", b"I", b"T", b"E", b"", b"II"]))
    elif kind == ord("C"):
        body = draw(st.sampled_from(TAGS))
    elif kind == ord("E"):
        body = draw(st.sampled_from([b"SERROR\0VERROR\0C42601\0Mx\0\0", b"SFATAL\0VFATAL\0Mx\0\0"]))
    else:
        body = draw(st.binary(max_size=12))
    return m.message(bytes([kind]), body)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def state(tx: Transaction, scanner: Scanner) -> tuple:
    return (list(tx.pending), tx.status, tx.mode, tx.unsynced, tx.in_data, tx.partial, tx.edge,
            scanner.in_message(), scanner.kept())


rounds_st = st.lists(
    st.tuples(
        st.lists(st.tuples(st.sampled_from(list(CLIENT_KINDS)), st.binary(max_size=6)), max_size=6),
        st.lists(server_message(), max_size=10),
        st.lists(st.integers(0, 400), max_size=4),
        st.booleans(),  # the replies come whole, in one chunk
        st.sampled_from([b"", b"I", b"I", b"T", b"E"]),  # a ReadyForQuery ends them (usually)
    ),
    min_size=1, max_size=6,
)


class OnePassTests(SynchronousTestCase):
    @given(rounds_st)
    @settings(max_examples=400)
    def test_one_pass_agrees_with_events(self, rounds: list) -> None:
        """Every server chunk leaves the one-pass tracker where scanning and then
        matching the events leaves the simple one, and both say the same about idleness."""
        simple, fast = Transaction(), Transaction()
        client = Scanner(watch=CLIENT_WATCH, max_length=10_000)
        servers = {id(tx): Scanner(watch=SERVER_WATCH, collect=SERVER_COLLECT) for tx in (simple, fast)}
        for requests, replies, points, whole, last in rounds:
            data = b"".join(client_message(kind, body) for kind, body in requests)
            try:
                events = client.feed(data)
                simple.client(events, len(data))
                fast.client(events, len(data))
            except ProtocolViolation:
                return
            stream = b"".join(replies) + (m.ready_for_query(last) if last else b"")
            chunks = [stream] if whole else cut(stream, points)
            for chunk in chunks:
                outcomes = []
                for tx in (simple, fast):
                    scanner = servers[id(tx)]
                    try:
                        ready = tx.replies(scanner, chunk) if tx is fast else None
                        if ready is None:
                            ready = tx.server(scanner.feed(chunk))
                        outcomes.append((ready, state(tx, scanner)))
                    except ProtocolViolation as exc:
                        outcomes.append(("violation", str(exc)))
                self.assertEqual(outcomes[0], outcomes[1])
                if outcomes[0][0] == "violation":
                    return

    @given(st.lists(st.tuples(st.sampled_from(list(CLIENT_KINDS + b"QQQQX\0")), body_st), max_size=12),
           st.lists(st.integers(0, 200), max_size=6), st.lists(st.booleans(), max_size=12))
    @settings(max_examples=400)
    def test_whole_query_agrees_with_events(self, requests: list, points: list, answers: list) -> None:
        """A client chunk taken whole as one Query, or walked once as a batch of whole
        requests (session mode), leaves the tracker and the scanner where feeding it
        does; ReadyForQuery now and then empties the queue between."""
        simple, fast = Transaction(), Transaction()
        scanners = {id(tx): Scanner(watch=CLIENT_WATCH, max_length=10_000, strict=True) for tx in (simple, fast)}
        messages = [client_message(kind, body) for kind, body in requests]
        batches = [b"".join(messages[i:i + 3]) for i in range(0, len(messages), 3)]
        chunks = messages + batches + cut(b"".join(messages), points)
        for i, chunk in enumerate(chunks):
            if not chunk:
                continue
            outcomes = []
            for tx in (simple, fast):
                scanner = scanners[id(tx)]
                try:
                    if tx is fast and chunk[0] == ord("Q") and scanner.whole(chunk) and tx.query():
                        end = None
                    elif tx is fast and scanner.between() and tx.batch(chunk, scanner.max_length):
                        end = None
                    else:
                        end = tx.client(scanner.feed(chunk), len(chunk))
                    if i < len(answers) and answers[i]:
                        tx.server([(ord("Z"), b"I", 0)])
                    outcomes.append((end, state(tx, scanner)))
                except ProtocolViolation as exc:
                    outcomes.append(("violation", str(exc)))
            self.assertEqual(outcomes[0], outcomes[1])
            if outcomes[0][0] == "violation" or outcomes[0][0] is not None:
                return

    def test_usual_reply_takes_the_one_pass(self) -> None:
        """A Query's reply read whole is matched by its ReadyForQuery alone."""
        tx = Transaction()
        tx.client([(ord("Q"), None, 10)], 10)
        scanner = Scanner(watch=SERVER_WATCH, collect=SERVER_COLLECT)
        reply = (m.message(b"T", b"\0\0") + m.message(b"D", b"\0\0") + m.message(b"C", b"SELECT 1\0")
                 + m.ready_for_query(b"I"))
        self.assertIs(tx.replies(scanner, reply), True)
        self.assertEqual(list(tx.pending), [])

    def test_error_takes_the_events(self) -> None:
        """An ErrorResponse in the chunk leaves the matching to the events, with nothing
        changed."""
        tx = Transaction()
        tx.client([(ord("Q"), None, 10)], 10)
        scanner = Scanner(watch=SERVER_WATCH, collect=SERVER_COLLECT)
        reply = m.message(b"E", b"SERROR\0\0") + m.ready_for_query(b"I")
        self.assertIsNone(tx.replies(scanner, reply))
        self.assertEqual(list(tx.pending), [ord("Q")])
        self.assertIsNone(scanner.in_message())
