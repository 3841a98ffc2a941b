"""The transaction-boundary tracker, fed real client bytes through the relay's scanner;
randomised schedules and chunk splits included."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fuzz import run as fuzz_run
from fuzz import tracker_model as tm
from fuzz.targets import PropertyFailure
from fuzz.tracker_model import (
    CLIENT_KINDS,
    COPY_DATA,
    COPY_DONE,
    DELIVER,
    PROCESS,
    SEND,
    Request,
    ServerModel,
    TrackerCase,
    check_tracker,
    discipline,
)
from odissey.transaction import CLIENT_WATCH, Transaction
from odissey.wire import messages as m
from odissey.wire.errors import ProtocolViolation
from odissey.wire.scanner import Event, Scanner

Q, S, E, P, B, H, D, c, f, X = b"QSEPBHdcfX"


def stream(*kinds: int) -> bytes:
    """Client messages of these types (bodies are filler; the tracker reads none)."""
    return b"".join(m.message(bytes([k]), b"" if k in (S, H, c, X) else b"x\0") for k in kinds)


def z(status: bytes) -> list:
    return [(ord("Z"), status, 0)]


G: list[Event] = [(ord("G"), None, 0)]


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
        error: list[Event] = [(ord("E"), b"SERROR\0\0", 0)]
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
        client.send(D, D, D, c, S)
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


class ModelTests(SynchronousTestCase):
    """The model of PostgreSQL the tracker is checked against answers as the protocol
    documentation says (fuzz/tracker_model.py)."""

    def answers(self, *requests: Request) -> list[bytes]:
        model = ServerModel()
        return [bytes(kind for kind, _ in model.process(r)) for r in requests]

    def test_describe_close_and_function_call(self) -> None:
        """Describe of a statement: ParameterDescription then RowDescription or NoData; of
        a portal: one of those; Close: CloseComplete; FunctionCall: its result, then
        ReadyForQuery."""
        self.assertEqual(
            self.answers(Request(tm.D, variant=3), Request(tm.D, variant=0), Request(tm.C),
                         Request(S), Request(tm.F)),
            [b"tT", b"n", b"3", b"Z", b"VZ"],
        )

    def test_extended_error_discards_until_sync(self) -> None:
        """After a failed Bind everything up to the Sync is discarded, a Query and a
        FunctionCall included; an error in a Query or FunctionCall discards nothing."""
        self.assertEqual(
            self.answers(Request(B, fails=True), Request(Q), Request(tm.F), Request(E),
                         Request(S), Request(tm.F, fails=True), Request(Q)),
            [b"E", b"", b"", b"", b"Z", b"EZ", b"CZ"],
        )

    def test_copy_in_both_protocols(self) -> None:
        """Copy-in ignores Sync and Flush; a Query's COPY ends with ReadyForQuery, an
        Execute's waits for a Sync, and a failed one makes the server discard until it."""
        copy = Request(Q, copies=True)
        self.assertEqual(
            self.answers(copy, Request(S), Request(H), Request(COPY_DATA), Request(COPY_DONE)),
            [b"G", b"", b"", b"", b"CZ"],
        )
        extended = Request(E, copies=True)
        self.assertEqual(
            self.answers(extended, Request(S), Request(COPY_DATA, fails=True), Request(Q),
                         Request(S)),
            [b"G", b"", b"E", b"", b"Z"],
        )
        self.assertEqual(self.answers(copy, Request(Q)), [b"G", b"EZ"])  # consumed by the copy

    def test_failed_block_fails_all_but_its_end(self) -> None:
        """In a failed transaction block everything fails until ROLLBACK, statuses T, E, I."""
        model = ServerModel()
        begin, fails = Request(Q, toggles=True), Request(Q, fails=True)
        self.assertEqual(model.process(begin)[-1], (ord("Z"), b"T"))
        self.assertEqual(model.process(fails)[-1], (ord("Z"), b"E"))
        self.assertEqual(model.process(Request(Q))[-1], (ord("Z"), b"E"))
        self.assertEqual(model.process(begin)[-1], (ord("Z"), b"I"))


kind_st = st.sampled_from(list(CLIENT_KINDS))
rarely_st = st.integers(0, 5).map(lambda n: n == 0)
request_st = st.builds(Request, kind_st, rarely_st, rarely_st, rarely_st, st.integers(0, 255))
action_st = st.tuples(st.sampled_from([SEND, PROCESS, DELIVER]), st.integers(-2, 60))


class ModelScheduleTests(SynchronousTestCase):
    @given(st.lists(request_st, max_size=25), st.lists(action_st, max_size=40))
    @settings(max_examples=200, deadline=None)
    def test_tracker_agrees_with_the_model(
        self, requests: list[Request], actions: list[tuple[str, int]]
    ) -> None:
        """Any client requests (some failing, some starting a COPY or a block; COPYs ended
        before anything else is sent), sent in any pieces, processed and answered at any
        moment, replies cut anywhere: the tracker frees the server only when the model's
        server is done with the client, and ``idle`` always says what the model says."""
        check_tracker(TrackerCase(discipline(requests), tuple(actions)))

    def test_fuzz_driver(self) -> None:
        """The long-run driver's tracker cases pass for a thousand inputs of a fixed seed."""
        seed = int(os.environ.get("ODISSEY_FUZZ_SEED", "20240517"))
        print(f"fuzz/run.py --target tracker seed={seed} (set ODISSEY_FUZZ_SEED to change)")
        counts, failures = fuzz_run.fuzz(seed, 1000, target="tracker")
        for failure in failures:
            fuzz_run.report_failure(seed, failure, "tracker")
        self.assertEqual(failures, [])
        for key in ("tracker/free+released", "tracker/held"):
            self.assertIn(key, counts)

    def test_checker_catches_a_tracker_that_frees_too_early(self) -> None:
        """The check is not vacuous: a tracker that frees at any ReadyForQuery fails it."""

        class Eager(Transaction):
            def server(self, events: list) -> bool:
                return super().server(events) or any(k == ord("Z") for k, _, _ in events)

        case = TrackerCase((Request(Q, toggles=True), Request(Q)))
        self.assertEqual(check_tracker(case), "held")  # in the block BEGIN opened
        with self.assertRaises(PropertyFailure):
            check_tracker(case, Eager)

    def test_checker_fails_a_tracker_that_refuses_a_driver(self) -> None:
        """Refusing a client that sends other messages inside COPY data is a safe outcome;
        refusing what a driver sends (a Flush among its CopyData) is a failure."""

        class NoFlushInCopy(Transaction):
            def client(self, events: list, length: int) -> int | None:
                if self.in_data and any(k == H for k, _, _ in events):
                    raise ProtocolViolation("Flush inside COPY data")
                return super().client(events, length)

        copy = (Request(Q, copies=True), Request(COPY_DATA))
        schedule = ((SEND, -1), (PROCESS, 1), (DELIVER, -2), (SEND, -1), (SEND, -1))
        driver = TrackerCase(copy + (Request(H), Request(COPY_DONE)), schedule)
        self.assertEqual(check_tracker(driver), "free+released")
        with self.assertRaises(PropertyFailure):
            check_tracker(driver, NoFlushInCopy)
        wild = TrackerCase(copy + (Request(Q),), schedule)
        self.assertEqual(check_tracker(wild), "refused")


class CopyRaceTests(SynchronousTestCase):
    """A client that sends other messages between CopyData and its CopyDone/CopyFail:
    whether PostgreSQL runs them (the COPY failed on an earlier row and left copy-in mode)
    or consumes them (the COPY is still reading) depends on the data. The tracker cannot
    know, so it refuses them as a protocol violation (the relay then drops the client and
    closes the server). Drivers never send anything there."""

    def test_query_sent_into_copy_data(self) -> None:
        """CopyData, then BEGIN, in one chunk: refused."""
        client = Client()
        client.send(Q)
        self.assertFalse(client.tx.server(reply(GIN)))
        with self.assertRaises(ProtocolViolation):
            client.send(D, Q)

    def test_sync_sent_into_simple_copy_data(self) -> None:
        """A Sync between the CopyData of a simple COPY and its end: refused."""
        client = Client()
        client.send(Q)
        client.tx.server(reply(GIN))
        with self.assertRaises(ProtocolViolation):
            client.send(D, S)

    def test_sync_sent_into_extended_copy_data(self) -> None:
        """libpq's Sync right after an extended COPY's Execute is fine; one after its
        CopyData, before CopyDone, is refused."""
        client = Client()
        client.send(P, B, E, S)
        client.tx.server(reply(ONE, TWO, GIN))
        with self.assertRaises(ProtocolViolation):
            client.send(D, S)

    def test_request_after_early_copy_data(self) -> None:
        """CopyData sent before the server announced the COPY, then a Query before
        CopyDone: refused too, whatever the server answers later."""
        client = Client()
        with self.assertRaises(ProtocolViolation):
            client.send(Q, D, Q)

    def test_terminate_inside_copy_data(self) -> None:
        """A client may say goodbye in the middle of its COPY data."""
        client = Client()
        client.send(Q)
        client.tx.server(reply(GIN))
        self.assertIsNotNone(client.send(D, X))


class OneReadTests(SynchronousTestCase):
    def test_whole_copy_answered_in_one_read(self) -> None:
        """CopyInResponse, CommandComplete and ReadyForQuery in one read, after psql sent
        Query, CopyData and CopyDone at once: free at once, nothing left queued."""
        client = Client()
        client.send(Q, D, c, P, B, E, S)
        self.assertTrue(client.tx.server(reply(GIN, CC, ZI, ONE, TWO, CC, ZI)))
        self.assertEqual(list(client.tx.pending), [])


class MessageShapeTests(SynchronousTestCase):
    """Messages PostgreSQL would refuse only once it reads them are refused as they
    arrive, before the server they would break could be handed to another client."""

    def test_flush_or_sync_with_a_body(self) -> None:
        """Flush and Sync have no body."""
        for kind in (H, S):
            tx = Transaction()
            with self.assertRaises(ProtocolViolation):
                tx.client(Scanner(watch=CLIENT_WATCH).feed(m.message(bytes([kind]), b"junk")), 9)

    def test_small_message_over_the_limit(self) -> None:
        """An Execute longer than the 10,000 bytes PostgreSQL reads of one is refused."""
        data = m.message(b"E", b"\0" * 20000)
        with self.assertRaises(ProtocolViolation):
            Transaction().client(Scanner(watch=CLIENT_WATCH).feed(data), len(data))

    def test_pooler_ends_a_departed_clients_copy_data(self) -> None:
        """A client gone inside its CopyData after the COPY failed: the Sync the pooler
        sends to end the discarding is accepted, not refused as more COPY data."""
        client = Client()
        client.send(P, B, E, S)
        client.tx.server(reply(ONE, TWO, GIN))
        client.send(D)
        client.tx.server(reply(ERR))
        self.assertTrue(client.tx.skipping)
        client.tx.pooler_sent(b"S")
        self.assertTrue(client.tx.server(reply(ZI)))

    def test_statement_after_a_failed_copy_without_copy_done(self) -> None:
        """A COPY that fails on its data ends copy-in: a driver that reacts to the error
        with its next statement, without CopyDone, is served (older pgjdbc does this)."""
        client = Client()
        client.send(Q)
        client.tx.server(reply(GIN))
        client.send(D)
        self.assertTrue(client.tx.server(reply(ERR, ZI)))
        client.send(Q)
        self.assertTrue(client.tx.server(reply(CC, ZI)))
