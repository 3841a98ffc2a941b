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


# -- the extended protocol with prepared statements on (Statements.batch) ---------------

from odissey.statements import COLLECT, Registry, ServerStatements, Statement, Statements  # noqa: E402
from tests.harness import run_seed  # noqa: E402

_ERROR = m.message(b"E", b"SERROR\0VERROR\0C42601\0Mx\0\0")
#: Query and Parse texts: plain ones, and a Query that drops every statement.
TEXTS = (b"select 1", b"select 2", b"select $1")


class SharedNames(Registry):
    """A registry whose statements (and so Odissey's names for them) are those of its
    twin: two layers fed the same stream send the same bytes."""

    def __init__(self, names: dict) -> None:
        super().__init__(limit=3)
        self.names = names

    def statement(self, tail: bytes) -> Statement:
        if tail not in self.names:
            self.names[tail] = Statement(b"ODISSEY_T%d" % len(self.names), tail)
        return self.names[tail]


class Model:
    """Enough of PostgreSQL to answer what a pooler sends it: each request in order,
    its statements and unnamed statement kept, an error (the model's own, or one
    chosen at random) skipping to the next Sync as PostgreSQL does."""

    def __init__(self, rnd) -> None:
        self.rnd = rnd
        self.prepared: set = set()
        self.unnamed = False
        self.skipping = False
        self.rest = b""

    def answer(self, data: bytes) -> bytes:
        data = self.rest + data
        out, pos = [], 0
        while pos + 5 <= len(data):
            end = pos + 1 + int.from_bytes(data[pos + 1:pos + 5], "big")
            if end > len(data):
                break
            kind, body = data[pos:pos + 1], data[pos + 5:end]
            pos = end
            if self.skipping:
                if kind == b"S":
                    self.skipping = False
                    out.append(m.ready_for_query(b"I"))
                continue
            ok = self.rnd.random() > 0.08
            if kind == b"P":
                name = body[:body.index(b"\0")]
                if name:
                    ok = ok and name not in self.prepared
                    if ok:
                        self.prepared.add(name)
                else:
                    self.unnamed = ok
                reply = m.PARSE_COMPLETE
            elif kind == b"B":
                i = body.index(b"\0") + 1
                name = body[i:body.index(b"\0", i)]
                ok = ok and (name in self.prepared if name else self.unnamed)
                reply = m.message(b"2")
            elif kind == b"D":
                name = body[1:-1]
                if body[:1] == b"S":
                    ok = ok and (name in self.prepared if name else self.unnamed)
                    reply = m.message(b"t", b"\0\0") + m.message(b"n")
                else:
                    reply = m.message(b"n")
            elif kind == b"E":
                reply = m.message(b"D", b"\0\0") + m.command_complete(b"SELECT 1")
            elif kind == b"C":
                if body[:1] == b"S":
                    if body[1:-1]:
                        self.prepared.discard(body[1:-1])
                    else:
                        self.unnamed = False
                reply = m.CLOSE_COMPLETE
            elif kind == b"S":
                out.append(m.ready_for_query(b"I"))
                continue
            elif kind == b"Q":
                self.unnamed = False
                if ok and body.lower().startswith(b"discard all"):
                    self.prepared.clear()
                    reply = m.command_complete(b"DISCARD ALL")
                else:
                    reply = m.command_complete(b"SELECT 1")
                out.append((reply if ok else _ERROR) + m.ready_for_query(b"I"))
                continue
            else:  # a Flush
                continue
            if ok:
                out.append(reply)
            else:
                out.append(_ERROR)
                self.skipping = True
        self.rest = data[pos:]
        return b"".join(out)


def random_message(rnd) -> bytes:
    """One client message of a driver's extended-protocol stream, named or not."""
    name = rnd.choice((b"", b"", b"", b"a", b"b"))
    kind = rnd.choice("PPBBBBDEEESSSHCQ")
    if kind == "P":
        return m.parse(name, rnd.choice(TEXTS) + b"\0\0\0")
    if kind == "B":
        return m.bind(rnd.choice((b"", b"", b"c")), name, b"\0\0\0\0\0\0")
    if kind == "D":
        return m.describe(rnd.choice(b"PPS").to_bytes(1, "big"), name if rnd.random() < 0.5 else b"")
    if kind == "E":
        return m.message(b"E", b"\0\0\0\0\0")
    if kind == "S":
        return m.sync()
    if kind == "H":
        return m.message(b"H")
    if kind == "C":
        return m.close(b"S", name)
    return m.query(rnd.choice(("select 1", "discard all")))


def driver_batch(rnd) -> bytes:
    """What drivers send per statement: pgbench -M extended (Parse, Bind, Describe,
    Execute of the unnamed statement), -M prepared (Bind and Execute of a named one),
    with a Sync or a Flush, or a Parse of the statement first, or a DISCARD ALL."""
    name = rnd.choice((b"a", b"b"))
    execute = m.message(b"E", b"\0\0\0\0\0")
    end = m.sync() if rnd.random() < 0.85 else m.message(b"H")
    shape = rnd.randrange(5)
    if shape == 0:
        return (m.parse(b"", rnd.choice(TEXTS) + b"\0\0\0") + m.bind(b"", b"", b"\0\0\0\0\0\0")
                + m.describe(b"P", b"") + execute + end)
    if shape == 1:
        return m.bind(b"", name, b"\0\0\0\0\0\0") + execute + end
    if shape == 2:
        return m.bind(b"", b"", b"\0\0\0\0\0\0") + execute + end
    if shape == 3:
        return m.parse(name, rnd.choice(TEXTS) + b"\0\0\0") + m.sync()
    return m.query("discard all")


class Side:
    """One client's statements layer and tracker in front of one server, fed as the
    relay feeds them: ``fast`` takes Statements.batch and Transaction.replies where
    they apply, the other always the events."""

    def __init__(self, fast: bool, names: dict) -> None:
        self.fast = fast
        self.tx = Transaction()
        self.registry = SharedNames(names)
        self.statements = Statements(self.registry, self.tx)
        self.statements.server = ServerStatements()
        self.scanner = Scanner(watch=CLIENT_WATCH, collect=COLLECT, max_length=10_000, strict=True)
        self.replies = Scanner(watch=SERVER_WATCH, collect=SERVER_COLLECT)
        self.batched = self.quick = 0  # chunks the one-pass paths took

    def send(self, data: bytes) -> tuple:
        """What goes to the server, what the client is answered at once, and the Parse
        texts the relay reads for session state."""
        statements = self.statements
        batch = statements.batch(data, self.scanner.max_length) if self.fast else None
        if batch is not None:
            self.batched += 1
            out, parses = batch
            return out, b"", [(kind, body) for kind, body, _end in parses]
        events = self.scanner.feed(data)
        partial = self.scanner.in_message()
        holding = partial is not None and partial[0] in COLLECT
        out, view = statements.client(data, events, holding)
        self.tx.client(view, len(out))
        self.tx.settle()
        immediate, statements.immediate = b"".join(statements.immediate), []
        return out, immediate, [(kind, body) for kind, body, _end in events if kind == ord("P")]

    def receive(self, data: bytes) -> tuple:
        """What the client gets of a server chunk, and whether the server is free."""
        statements = self.statements
        edited = bool(statements.editing or statements.held)
        if self.fast and not edited:
            ready = self.tx.replies(self.replies, data)
            if ready is not None:
                self.quick += 1
                return data, ready
        events = self.replies.feed(data)
        if edited:
            data, events = statements.begin(data, events)
        for kind, _body, _end in events:
            if kind == ord("E"):
                statements.failed()
        ready = self.tx.server(events)
        if edited:
            partial = self.replies.in_message()
            data = statements.finish(partial[0] if partial else None, self.replies.kept())
        return data, ready

    def state(self) -> tuple:
        s = self.statements
        server = s.server
        registry = self.registry
        return (state(self.tx, self.replies), self.scanner.in_message(),
                {name: st.name for name, st in s.named.items()}, s.unnamed,
                server.unnamed, server.unnamed is s.unnamed and s.unnamed is not None,
                [(name, epoch) for name, (_st, epoch) in server.prepared.items()],
                [(p[0], p[1]) for p in s.payloads], s.editing, s.edge, s.syncs, s.held,
                s._unsure, s._unsure is s.unnamed and s._unsure is not None, s._unsure_at, s._doubt,
                registry.client_parses, registry.server_parses, registry.binds)


class ExtendedPassTests(SynchronousTestCase):
    def test_batch_and_replies_agree_with_events(self) -> None:
        """Random extended-protocol streams (named and unnamed statements, pipelined
        batches, Close, DISCARD ALL), cut at random or whole, answered by a model of
        PostgreSQL with random errors and its replies cut at random: Statements.batch
        and Transaction.replies send and answer what the events' path does, and leave
        every piece of state as it does. Seeded (printed; ODISSEY_SEED replays)."""
        import random
        seed = run_seed(self)
        batched = quick = chunks_seen = 0
        for run in range(1500):
            rnd = random.Random(f"{seed}-{run}")
            names: dict = {}
            sides = [Side(False, names), Side(True, names)]
            model = Model(rnd)
            unanswered = b""
            for _ in range(rnd.randint(1, 12)):
                if rnd.random() < 0.2:  # the next attachment: statements used before may go
                    for side in sides:
                        side.statements.server.epoch += 1
                if rnd.random() < 0.6:
                    chunk = b"".join(driver_batch(rnd) for _ in range(rnd.choice((1, 1, 1, 2, 3))))
                else:
                    chunk = b"".join(random_message(rnd) for _ in range(rnd.randint(1, 6)))
                if rnd.random() < 0.7:
                    chunks = [chunk]
                else:
                    chunks = cut(chunk, [rnd.randrange(400) for _ in range(rnd.randint(1, 3))])
                for piece in chunks:
                    if not piece:
                        continue
                    outcomes = []
                    for side in sides:
                        try:
                            outcomes.append((side.send(piece), side.state()))
                        except ProtocolViolation as exc:
                            outcomes.append(("violation", str(exc)))
                    self.assertEqual(outcomes[0], outcomes[1], f"seed {seed} run {run}")
                    if outcomes[0][0] == "violation":
                        break
                    sent = outcomes[0][0][0]
                    chunks_seen += 1
                    unanswered += sent
                    if rnd.random() < 0.4:  # the client pipelines its next chunk first
                        continue
                    replies, unanswered = model.answer(unanswered), b""
                    if not replies:
                        continue
                    if rnd.random() < 0.6:
                        pieces = [replies]
                    else:
                        pieces = cut(replies, [rnd.randrange(len(replies) + 1) for _ in range(2)])
                    for reply in pieces:
                        if not reply:
                            continue
                        got = [(side.receive(reply), side.state()) for side in sides]
                        self.assertEqual(got[0], got[1], f"seed {seed} run {run}")
                else:
                    continue
                break
            batched += sides[1].batched
            quick += sides[1].quick
        print(f"{chunks_seen} client chunks: {batched} batched, {quick} server chunks in one pass")
        self.assertGreater(batched, chunks_seen // 20)
        self.assertGreater(quick, chunks_seen // 20)

    def test_tracked_query_answered_by_its_ready_for_query_alone(self) -> None:
        """A DISCARD ALL whose ReadyForQuery is read apart from its CommandComplete, with
        a batch pipelined behind it, is retired in one pass; the batch stays queued."""
        side = Side(True, {})
        side.send(m.parse(b"", b"select 1\0\0\0") + m.sync())
        side.receive(m.PARSE_COMPLETE + m.ready_for_query(b"I"))
        side.send(m.query("discard all") + m.message(b"E", b"\0\0\0\0\0") + m.sync())
        self.assertEqual(side.statements._doubt, 1)
        side.receive(m.command_complete(b"DISCARD ALL"))
        self.assertEqual(side.receive(m.ready_for_query(b"I")), (m.ready_for_query(b"I"), False))
        self.assertEqual(side.quick, 2)
        self.assertEqual(side.statements._doubt, 0)
        self.assertEqual(list(side.tx.pending), [ord("E"), ord("S")])

    def test_usual_chunks_take_the_one_pass(self) -> None:
        """pgbench's -M extended and -M prepared transactions, once their statement is
        known, are batched on the way in and matched by ReadyForQuery on the way out."""
        side = Side(True, {})
        reply = m.message(b"D", b"\0\0") + m.command_complete(b"SELECT 1") + m.ready_for_query(b"I")
        extended = (m.parse(b"", b"select 1\0\0\0") + m.bind(b"", b"", b"\0\0\0\0\0\0")
                    + m.describe(b"P", b"") + m.message(b"E", b"\0\0\0\0\0") + m.sync())
        self.assertEqual(side.send(extended)[0], extended)
        side.receive(m.PARSE_COMPLETE + m.message(b"2") + m.message(b"n") + reply)
        side.send(m.parse(b"P0_1", b"select 1\0\0\0") + m.sync())
        side.receive(m.PARSE_COMPLETE + m.ready_for_query(b"I"))
        rest = m.message(b"E", b"\0\0\0\0\0") + m.sync()
        sent = side.send(m.bind(b"", b"P0_1", b"\0\0\0\0\0\0") + rest)[0]
        self.assertEqual(sent, m.bind(b"", b"ODISSEY_T0", b"\0\0\0\0\0\0") + rest)
        self.assertEqual(side.receive(m.message(b"2") + reply), (m.message(b"2") + reply, True))
        self.assertEqual((side.batched, side.quick), (2, 3))
        self.assertEqual(side.statements.unnamed, b"select 1\0\0\0")
