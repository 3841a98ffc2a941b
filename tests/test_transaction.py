"""The transaction-boundary tracker, fed real client bytes through the relay's scanner;
randomised schedules and chunk splits included."""

from __future__ import annotations

import copy

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
        self.assertEqual(list(client.tx.pending), [P, B, E])
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


def reply(*kinds: int) -> list:
    """Server events of these types (an ErrorResponse or ReadyForQuery(I) gets a body)."""
    return [(k, b"I" if k == ord("Z") else b"SERROR\0\0" if k == ord("E") else None, 0) for k in kinds]


ERR, ZI, ONE, TWO, CC, GIN = b"EZ12CG"


class ExtendedErrorTests(SynchronousTestCase):
    """After an error in an extended-protocol message PostgreSQL discards everything up to
    the next Sync, a Query included: the tracker must free the server at that Sync's answer."""

    def test_failed_parse_then_query_before_sync(self) -> None:
        """Parse fails, the Query before the Sync is discarded: one ReadyForQuery frees it."""
        client = Client()
        client.send(P, Q, S)
        self.assertTrue(client.tx.server(reply(ERR, ZI)))

    def test_query_after_good_extended_messages_fails_itself(self) -> None:
        """The extended messages succeed and the Query fails: two ReadyForQuery are due."""
        client = Client()
        client.send(P, B, E, Q, S)
        self.assertFalse(client.tx.server(reply(ONE, TWO, CC, ERR, ZI)))
        self.assertTrue(client.tx.server(reply(ZI)))

    def test_messages_sent_after_the_error_are_discarded(self) -> None:
        """A Query sent once the server is already discarding gets no ReadyForQuery."""
        client = Client()
        client.send(P)
        self.assertFalse(client.tx.server(reply(ERR)))
        self.assertFalse(client.tx.idle)  # the server waits for a Sync: nobody else may use it
        client.send(Q, B, E)
        client.send(S)
        self.assertTrue(client.tx.server(reply(ZI)))

    def test_lone_copy_data_while_idle(self) -> None:
        """CopyData, CopyDone or CopyFail outside a COPY is dropped by PostgreSQL: no server needed."""
        client = Client()
        client.send(D)
        self.assertTrue(client.tx.idle)
        client.send(c, D, f)
        self.assertTrue(client.tx.idle)

    def test_copy_error_frees_at_its_ready_for_query(self) -> None:
        """A COPY that fails server-side ends copy-in; the client's later copy messages are dropped."""
        client = Client()
        client.send(Q)
        client.tx.server(reply(GIN))
        client.send(D)
        self.assertTrue(client.tx.server(reply(ERR, ZI)))
        client.send(D, c)
        self.assertTrue(client.tx.idle)


class ServerModel:
    """A small model of how PostgreSQL processes a client stream: which messages fail,
    what each answers, when it discards until Sync, COPY in both protocols."""

    def __init__(self) -> None:
        self.skipping = False
        self.copy = ""  # "", "simple" or "extended": the protocol that started copy-in
        self.block = False
        self.failed_block = False
        self.held = False  # extended work processed and not synced yet

    def settles(self, sent: list) -> bool:
        """Would the messages still unread give no reply and leave the server clean?"""
        future = copy.deepcopy(self)
        if any(future.process(*message) for message in sent):
            return False
        return not future.skipping and not future.copy and not future.held and future.status() == b"I"

    def status(self) -> bytes:
        return b"E" if self.failed_block else b"T" if self.block else b"I"

    def process(self, kind: int, fails: bool, copies: bool, toggles: bool) -> list:
        out = []
        if self.copy:
            if kind == D or kind in (S, H):
                return out
            simple = self.copy == "simple"
            self.copy = ""
            if kind == c and not fails:
                out.append(CC)
            else:
                out.append(ERR)
                if not simple:
                    self.skipping = True
            if simple:
                out += [ZI]
                self.held = False
            return [(k, self.status() if k == ZI else b"SERROR\0\0" if k == ERR else None, 0) for k in out]
        if self.skipping and kind != S:
            return out
        if kind in (D, c, f, H):
            return out
        if kind == S:
            self.skipping = False
            self.held = False
            return [(ZI, self.status(), 0)]
        if kind == Q:
            self.held = False
            if fails:
                if self.block:
                    self.failed_block = True
                return [(ERR, b"SERROR\0\0", 0), (ZI, self.status(), 0)]
            if copies:
                self.copy = "simple"
                return [(GIN, None, 0)]
            if toggles:
                self.block = not self.block
                self.failed_block = False
            return [(CC, None, 0), (ZI, self.status(), 0)]
        # Parse, Bind, Execute
        if fails:
            self.skipping = True
            if self.block:
                self.failed_block = True
            return [(ERR, b"SERROR\0\0", 0)]
        self.held = True
        if kind == E and copies:
            self.copy = "extended"
            return [(GIN, None, 0)]
        return [({P: ONE, B: TWO, E: CC}[kind], None, 0)]


class ModelScheduleTests(SynchronousTestCase):
    @given(st.lists(st.tuples(st.sampled_from([Q, S, P, B, E, H, D, c, f]), st.booleans(), st.booleans(),
                              st.booleans(), st.integers(0, 6)), max_size=40),
           st.lists(st.integers(0, 10_000), max_size=3))
    @settings(max_examples=400, deadline=None)
    def test_tracker_agrees_with_the_model(self, steps: list, cuts: list[int]) -> None:
        """Random client messages (some failing, some starting a COPY or a block), replies
        delivered at random moments: the tracker frees the server exactly when the model's
        server has answered everything, discards nothing, copies nothing, holds no
        unsynced work and is outside a transaction block."""
        client = Client()
        model = ServerModel()
        sent: list[tuple[int, bool, bool, bool]] = []
        for kind, fails, copies, toggles, deliver in steps:
            client.send(kind, cuts=tuple(cuts))
            sent.append((kind, fails and kind in (P, B, E, Q, c), copies, toggles))
            replies = []  # the answers to several messages may come in one read
            for _ in range(deliver):
                if sent:
                    replies += model.process(*sent.pop(0))
            if client.tx.server(replies):
                self.assertTrue(model.settles(sent), (sent, vars(model)))
        while sent:
            client.tx.server(model.process(*sent.pop(0)))
        truth = not model.skipping and not model.copy and not model.held and model.status() == b"I"
        self.assertEqual(client.tx.idle, truth, vars(model))


class OneReadTests(SynchronousTestCase):
    def test_whole_copy_answered_in_one_read(self) -> None:
        """CopyInResponse, CommandComplete and ReadyForQuery in one read, after psql sent
        Query, CopyData and CopyDone at once: free at once, nothing left queued."""
        client = Client()
        client.send(Q, D, c, P, B, E, S)
        self.assertTrue(client.tx.server(reply(GIN, CC, ZI, ONE, TWO, CC, ZI)))
        self.assertEqual(list(client.tx.pending), [])
