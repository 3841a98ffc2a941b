"""The transaction-boundary tracker, on scanner events; randomised schedules included."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from odissey.transaction import Transaction

Q, S, E, P, B, H, D, c, f, X = b"QSEPBHdcfX"


def ev(*kinds: int) -> list:
    return [(k, None, 0) for k in kinds]


def z(status: bytes) -> list:
    return [(ord("Z"), status, 0)]


G = [(ord("G"), None, 0)]


class TransactionTests(SynchronousTestCase):
    def test_simple_query(self) -> None:
        """One Query, one ReadyForQuery(I): idle again."""
        tx = Transaction()
        tx.client(ev(Q))
        self.assertFalse(tx.server([]))
        self.assertTrue(tx.server(z(b"I")))

    def test_transaction_block_keeps_server(self) -> None:
        """Status T keeps the server attached until the block ends with I."""
        tx = Transaction()
        tx.client(ev(Q))
        self.assertFalse(tx.server(z(b"T")))
        tx.client(ev(Q))
        self.assertFalse(tx.server(z(b"E")))
        tx.client(ev(Q))
        self.assertTrue(tx.server(z(b"I")))

    def test_pipeline_of_syncs(self) -> None:
        """Three Syncs in flight need three ReadyForQuery before the server is free."""
        tx = Transaction()
        tx.client(ev(P, B, E, S, P, B, E, S, P, B, E, S))
        self.assertFalse(tx.server(z(b"I") + z(b"I")))
        self.assertTrue(tx.server(z(b"I")))

    def test_flush_without_sync(self) -> None:
        """Flush expects no ReadyForQuery: nothing is counted, nothing is freed early."""
        tx = Transaction()
        tx.client(ev(P, B, E, H))
        self.assertEqual(tx.outstanding, 0)
        error = [(ord("E"), b"SERROR\0\0", 0)]
        self.assertFalse(tx.server(error))  # an error before Sync does not free the server

    def test_extended_copy_in_ignores_syncs(self) -> None:
        """libpq's Sync after an extended COPY and its Sync after CopyDone give one ReadyForQuery."""
        tx = Transaction()
        tx.client(ev(P, B, E, S))
        self.assertFalse(tx.server(G))
        tx.client(ev(D, D, S, D, c, S))  # a stray Sync in copy mode is ignored too
        self.assertTrue(tx.server(z(b"I")))

    def test_simple_copy_error_waits_for_client(self) -> None:
        """A COPY that fails server-side keeps the server until the client ends its copy."""
        tx = Transaction()
        tx.client(ev(Q))
        tx.server(G)
        tx.client(ev(D))
        self.assertFalse(tx.server(z(b"I")))  # error + Z while client still sends CopyData
        tx.client(ev(D, c))
        self.assertTrue(tx.idle)

    def test_terminate_offset(self) -> None:
        """Terminate is reported with where it starts."""
        tx = Transaction()
        self.assertEqual(tx.client([(Q, None, 10), (X, None, 15)]), 10)

    @given(st.lists(st.tuples(st.integers(1, 4), st.booleans(), st.booleans()), max_size=30))
    @settings(max_examples=300)
    def test_random_schedules(self, batches: list[tuple[int, bool, bool]]) -> None:
        """Any interleaving of pipelined requests and replies frees the server exactly when
        every request is answered and no transaction is open."""
        tx = Transaction()
        in_flight: list[bytes] = []  # statuses the server will answer, in order
        in_block = False
        for count, begin_or_end, answer_now in batches:
            for _ in range(count):
                if begin_or_end:
                    in_block = not in_block
                tx.client(ev(Q) if count % 2 else ev(P, B, E, S))
                in_flight.append(b"T" if in_block else b"I")
            if answer_now:
                while in_flight:
                    status = in_flight.pop(0)
                    free = tx.server(z(status))
                    self.assertEqual(free, not in_flight and status == b"I")
        while in_flight:
            status = in_flight.pop(0)
            self.assertEqual(tx.server(z(status)), not in_flight and status == b"I")
