"""The transaction-boundary tracker, fed real client bytes through the relay's scanner;
randomised schedules and chunk splits included."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from odissey.transaction import CLIENT_WATCH, Transaction
from odissey.wire import messages as m
from odissey.wire.scanner import Scanner

Q, S, E, P, B, H, D, c, f, X = b"QSEPBHdcfX"


def stream(*kinds: int) -> bytes:
    """Client messages of these types (bodies are filler; the tracker reads none)."""
    return b"".join(m.message(bytes([k]), b"" if k in (S, H, c, X) else b"x\0") for k in kinds)


def z(status: bytes) -> list:
    return [(ord("Z"), status, 0)]


G = [(ord("G"), None, 0)]


class Client:
    """Sends a tracker's client side real bytes through the relay's scanner, in pieces."""

    def __init__(self) -> None:
        self.tx = Transaction()
        self.scanner = Scanner(watch=CLIENT_WATCH)

    def send(self, *kinds: int, cuts: tuple[int, ...] = ()) -> int | None:
        data = stream(*kinds)
        bounds = [0, *sorted(cut % (len(data) + 1) for cut in cuts), len(data)]
        found = None
        for start, end in zip(bounds, bounds[1:]):
            piece = data[start:end]
            terminate = self.tx.client(self.scanner.feed(piece), len(piece))
            found = terminate if terminate is not None else found
        return found


class TransactionTests(SynchronousTestCase):
    def test_simple_query(self) -> None:
        """One Query, one ReadyForQuery(I): idle again."""
        client = Client()
        client.send(Q)
        self.assertFalse(client.tx.server([]))
        self.assertTrue(client.tx.server(z(b"I")))

    def test_transaction_block_keeps_server(self) -> None:
        """Status T keeps the server attached until the block ends with I."""
        client = Client()
        client.send(Q)
        self.assertFalse(client.tx.server(z(b"T")))
        client.send(Q)
        self.assertFalse(client.tx.server(z(b"E")))
        client.send(Q)
        self.assertTrue(client.tx.server(z(b"I")))

    def test_pipeline_of_syncs(self) -> None:
        """Three Syncs in flight need three ReadyForQuery before the server is free."""
        client = Client()
        client.send(P, B, E, S, P, B, E, S, P, B, E, S)
        self.assertFalse(client.tx.server(z(b"I") + z(b"I")))
        self.assertTrue(client.tx.server(z(b"I")))

    def test_flush_without_sync(self) -> None:
        """Flush expects no ReadyForQuery: nothing is counted, nothing is freed early."""
        client = Client()
        client.send(P, B, E, H)
        self.assertEqual(client.tx.outstanding, 0)
        self.assertFalse(client.tx.idle)
        error = [(ord("E"), b"SERROR\0\0", 0)]
        self.assertFalse(client.tx.server(error))  # an error before Sync does not free the server

    def test_next_batch_sent_before_the_answer(self) -> None:
        """A Parse/Bind/Execute sent after a Sync, before its ReadyForQuery: the server
        holds that work, so the answer to the Sync does not free it; the next Sync's does."""
        client = Client()
        client.send(P, B, E, S, P, B, E)
        self.assertFalse(client.tx.server(z(b"I")))
        self.assertFalse(client.tx.idle)
        client.send(S)
        self.assertTrue(client.tx.server(z(b"I")))

    def test_flush_after_sync_holds_nothing(self) -> None:
        """psycopg ends a pipeline with Sync, Flush: the server is free at the answer, in
        one chunk or two; a Flush after unsynced work does not make it clean."""
        client = Client()
        client.send(P, B, E, S, H)
        self.assertTrue(client.tx.server(z(b"I")))
        client.send(P, B, E, S)
        client.send(H)
        self.assertTrue(client.tx.server(z(b"I")))
        client.send(P, B, E, H)
        self.assertFalse(client.tx.idle)

    def test_half_sent_request(self) -> None:
        """A request whose header or body is still arriving keeps the server."""
        client = Client()
        client.send(Q)
        client.tx.server(z(b"I"))
        data = stream(Q)
        for split in range(1, len(data)):
            client.tx.client(client.scanner.feed(data[:split]), split)
            self.assertFalse(client.tx.idle, split)
            rest = data[split:]
            client.tx.client(client.scanner.feed(rest), len(rest))
            self.assertTrue(client.tx.server(z(b"I")), split)

    def test_extended_copy_in_ignores_syncs(self) -> None:
        """libpq's Sync after an extended COPY and its Sync after CopyDone give one ReadyForQuery."""
        client = Client()
        client.send(P, B, E, S)
        self.assertFalse(client.tx.server(G))
        client.send(D, D, S, D, c, S)  # a stray Sync in copy mode is ignored too
        self.assertTrue(client.tx.server(z(b"I")))

    def test_copy_sent_whole_before_the_server_announces_it(self) -> None:
        """psql sends Query, CopyData, CopyDone at once; libpq's extended COPY adds a Sync
        PostgreSQL ignores. The CopyInResponse that follows must not reopen the copy."""
        client = Client()
        client.send(Q, D, c)
        self.assertFalse(client.tx.server(G))
        self.assertTrue(client.tx.server(z(b"I")))
        client.send(P, B, E, S, D, c, S)
        self.assertFalse(client.tx.server(G))
        self.assertTrue(client.tx.server(z(b"I")))  # one ReadyForQuery for the two Syncs

    def test_copy_that_failed_before_it_began(self) -> None:
        """A COPY refused before copy-in mode (no such table): the client's CopyDone is
        forgotten with the answer, and a later COPY is tracked afresh."""
        client = Client()
        client.send(Q, D, c)
        self.assertTrue(client.tx.server([(ord("E"), b"SERROR\0\0", 0)] + z(b"I")))
        client.send(Q)
        self.assertFalse(client.tx.server(G))
        client.send(D)
        self.assertFalse(client.tx.idle)  # copying now
        client.send(c)
        self.assertTrue(client.tx.server(z(b"I")))

    def test_simple_copy_error_waits_for_client(self) -> None:
        """A COPY that fails server-side keeps the server until the client ends its copy."""
        client = Client()
        client.send(Q)
        client.tx.server(G)
        client.send(D)
        self.assertFalse(client.tx.server(z(b"I")))  # error + Z while client still sends CopyData
        client.send(D, c)
        self.assertTrue(client.tx.idle)

    def test_terminate_offset(self) -> None:
        """Terminate is reported with where it starts; a stream that ends at a request
        before it is still clean."""
        client = Client()
        self.assertEqual(client.send(Q, X), len(stream(Q)))
        self.assertTrue(client.tx.server(z(b"I")))

    @given(st.lists(st.tuples(st.integers(1, 4), st.booleans(), st.booleans(), st.booleans(), st.booleans()),
                    max_size=30),
           st.lists(st.integers(0, 10_000), max_size=4))
    @settings(max_examples=300)
    def test_random_schedules(self, batches: list[tuple[int, bool, bool, bool, bool]], cuts: list[int]) -> None:
        """Any interleaving of pipelined requests (some followed by an unsynced batch, some
        by a Flush), replies and chunk splits frees the server exactly when every request is answered,
        nothing unsynced is left on it and no transaction is open."""
        client = Client()
        in_flight: list[bytes] = []  # statuses the server will answer, in order
        in_block = False
        loose = False  # an unsynced Parse/Bind/Execute has been sent
        for count, begin_or_end, answer_now, leave_loose, flush in batches:
            for _ in range(count):
                if begin_or_end:
                    in_block = not in_block
                kinds = (Q,) if count % 2 and not loose else (P, B, E, S, H) if flush else (P, B, E, S)
                client.send(*kinds, cuts=tuple(cuts))
                loose = False
                in_flight.append(b"T" if in_block else b"I")
            if leave_loose:
                client.send(P, B, E, cuts=tuple(cuts))
                loose = True
            if answer_now:
                while in_flight:
                    status = in_flight.pop(0)
                    free = client.tx.server(z(status))
                    self.assertEqual(free, not in_flight and status == b"I" and not loose)
        if loose:
            client.send(S)
            in_flight.append(b"T" if in_block else b"I")
        while in_flight:
            status = in_flight.pop(0)
            self.assertEqual(client.tx.server(z(status)), not in_flight and status == b"I")
