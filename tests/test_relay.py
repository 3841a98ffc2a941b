"""Bytes through the relay: COPY both ways, big results, extended protocol, NOTIFY, pgbench."""

from __future__ import annotations

import subprocess
import time

import psycopg
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from odissey import config
from odissey.flow import PENDING_LIMIT
from odissey.params import params_from
from odissey.pool import Pool, PoolKey
from odissey.relay import Relay, RelayState
from odissey.session_state import SETTINGS
from odissey.statements import COLLECT
from odissey.testing import DEFAULT_PARAMS, FakeBackends, FakeClient, answer_cancel, command_complete, error
from odissey.transaction import CLIENT_WATCH
from odissey.wire import messages as m
from odissey.wire.scanner import Scanner
from tests.harness import IntegrationTest, have, route, vanish


class RelayTests(IntegrationTest):
    def routes(self) -> list[dict]:
        return [route(pool={"size": 4})]

    @inlineCallbacks
    def test_copy_in_and_out_10000_rows(self):
        """COPY FROM STDIN and COPY TO STDOUT carry 10 000 rows intact."""
        def roundtrip() -> tuple[int, int, int]:
            with self.odissey.connect() as conn:
                conn.execute("create temp table c (id int, body text)")
                with conn.cursor() as cur:
                    with cur.copy("copy c from stdin") as copy:
                        for i in range(10000):
                            copy.write_row((i, f"row {i}"))
                    count = cur.execute("select count(*), sum(id) from c").fetchone()
                    out = []
                    with cur.copy("copy c to stdout") as copy:
                        for row in copy.rows():
                            out.append(row)
                return count[0], count[1], len(out)

        count, total, out = yield self.thread(roundtrip)
        self.assertEqual((count, total, out), (10000, sum(range(10000)), 10000))

    @inlineCallbacks
    def test_twenty_megabyte_result(self):
        """A 20 MB result arrives whole."""
        def fetch() -> int:
            with self.odissey.connect() as conn:
                rows = conn.execute("select repeat('x', 1000) from generate_series(1, 20000)").fetchall()
                return sum(len(r[0]) for r in rows)

        self.assertEqual((yield self.thread(fetch)), 20_000_000)

    @inlineCallbacks
    def test_extended_protocol_and_prepared(self):
        """Parameters, server-side prepared statements and binary results pass through."""
        def run() -> list[int]:
            with self.odissey.connect() as conn:
                out = []
                conn.prepare_threshold = 5  # psycopg prepares after the 5th execution
                for i in range(8):
                    out.append(conn.execute("select %s::int * 2", (i,), prepare=True).fetchone()[0])
                with conn.cursor(binary=True) as cur:
                    out.append(cur.execute("select %s::int + 1", (41,)).fetchone()[0])
                return out

        self.assertEqual((yield self.thread(run)), [0, 2, 4, 6, 8, 10, 12, 14, 42])

    @inlineCallbacks
    def test_multi_statement_simple_query(self):
        """A multi-statement simple query returns each statement's result (psql)."""
        done = yield self.thread(self.odissey.psql, "select 1; select 2; select 'three'")
        self.assertEqual(done.stdout.split(), ["1", "2", "three"], done.stderr)

    @inlineCallbacks
    def test_error_then_continue(self):
        """An error in one statement leaves the session usable."""
        def run() -> tuple[str, int]:
            with self.odissey.connect() as conn:
                try:
                    conn.execute("select 1/0")
                except psycopg.errors.DivisionByZero as exc:
                    state = exc.sqlstate or ""
                return state, conn.execute("select 3").fetchone()[0]

        self.assertEqual((yield self.thread(run)), ("22012", 3))

    @inlineCallbacks
    def test_listen_notify(self):
        """LISTEN/NOTIFY notifications reach the listening session."""
        def run() -> list[str]:
            with self.odissey.connect() as listener, self.odissey.connect() as sender:
                listener.execute("listen odissey_channel")
                sender.execute("notify odissey_channel, 'hello'")
                got = []
                for note in listener.notifies(timeout=5, stop_after=1):
                    got.append(note.payload)
                return got

        self.assertEqual((yield self.thread(run)), ["hello"])

    @inlineCallbacks
    def test_pipeline_mode(self):
        """psycopg's pipeline mode (many Syncs in flight) gets every answer in order."""
        def run() -> list[int]:
            with self.odissey.connect() as conn:
                with conn.pipeline():
                    curs = [conn.execute("select %s::int", (i,)) for i in range(50)]
                return [c.fetchone()[0] for c in curs]

        self.assertEqual((yield self.thread(run)), list(range(50)))

    @inlineCallbacks
    def test_pgbench_session_mode(self):
        """pgbench (4 clients, extended protocol) runs through Odissey with no failures.
        (pgbench opens every connection before it runs a transaction, and a session
        holds its server from login: more clients than the pool's 4 would wait forever.)"""
        if not have("pgbench"):
            raise SkipTest("pgbench not installed")

        def bench() -> subprocess.CompletedProcess[str]:
            base = ["-h", "127.0.0.1", "-p", str(self.odissey.port), "-U", "app"]
            return subprocess.run(
                ["pgbench", "-n", "-c", "4", "-j", "2", "-t", "400", "-M", "extended", *base, "app"],
                capture_output=True, text=True, env=self.odissey.env(), timeout=120,
            )

        done = yield self.thread(bench)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("number of transactions actually processed: 1600/1600", done.stdout)
        self.assertIn("number of failed transactions: 0", done.stdout)


class CopyVanishTests(IntegrationTest):
    """A client that vanishes mid-COPY leaves nothing behind and no broken server."""

    def routes(self) -> list[dict]:
        return [route(pool={"size": 1})]

    @inlineCallbacks
    def test_client_gone_mid_copy_in(self):
        """Half a COPY FROM STDIN, then the client vanishes: no rows land, the server is reused."""
        def doomed() -> int:
            conn = self.odissey.connect()
            pid = conn.execute("select pg_backend_pid()").fetchone()[0]
            cur = conn.cursor()
            copy_ctx = cur.copy("copy items from stdin")
            copy = copy_ctx.__enter__()
            for i in range(1000):
                copy.write_row((80000 + i, "copy-vanished"))
            copy.write(b"81000\tpartial")  # a row cut short, no newline
            time.sleep(0.2)
            vanish(conn)
            return pid

        pid = yield self.thread(doomed)

        def after() -> tuple[int, int]:
            with self.odissey.connect() as conn:
                return (
                    conn.execute("select pg_backend_pid()").fetchone()[0],
                    conn.execute("select count(*) from items where note = 'copy-vanished'").fetchone()[0],
                )

        self.assertEqual((yield self.thread(after)), (pid, 0))


def relay_setup(
    mode: str = "transaction", size: int = 2, wanted: list[tuple[str, str]] | None = None, **options: object
) -> tuple[Relay, FakeClient, Pool, FakeBackends, MemoryReactorClock]:
    """A relay for a fake client on a pool of fake backends, all on one clock."""
    cfg = config.parse({
        "listen": ["tcp:0"], "storages": {"pg": {"host": "127.0.0.1"}},
        "routes": [{"database": "db", "user": "u", "storage": "pg",
                    "pool": {"mode": mode, "size": size, "reset_timeout": "5s",
                             **({"max_prepared_statements": options.pop("max_prepared_statements")}
                                if "max_prepared_statements" in options else {})}}],
    })
    reactor = MemoryReactorClock()
    backends = FakeBackends(reactor, **options)
    pool = Pool(PoolKey("db", "u"), cfg.routes[0], reactor, backends)
    pool.parameters_cache = list(DEFAULT_PARAMS)
    params = params_from(wanted or DEFAULT_PARAMS)
    client = FakeClient()
    relay = Relay(client, pool, params, {k: v for k, (_n, v) in params.items()}, 1 << 20)
    return relay, client, pool, backends, reactor


def counting_feeds(relay: Relay) -> list[bytes]:
    """Gives ``relay`` a scanner that records each chunk fed to it, in the list returned."""
    feeds: list[bytes] = []

    class Counting(Scanner):
        def feed(self, data: bytes) -> list:
            feeds.append(data)
            return super().feed(data)

    relay.scanner = Counting(watch=CLIENT_WATCH, collect=COLLECT, max_length=1 << 20, strict=True)
    return feeds


def attached(relay: Relay, reactor: MemoryReactorClock, backends: FakeBackends, data: bytes) -> None:
    """The client sends ``data``; the relay gets a server and the backend answers."""
    relay.clientData(data)
    reactor.advance(0)
    backends.flush()


class RelayUnitTests(SynchronousTestCase):
    """The relay between a fake client and fake backends, step by step."""

    def test_attaches_then_detaches_on_idle_ready(self) -> None:
        """In transaction mode a query takes a server and ReadyForQuery 'I' gives it back."""
        relay, client, pool, backends, reactor = relay_setup()
        relay.clientData(m.query("select 1"))
        self.assertEqual(relay.state, RelayState.ATTACHED)  # the fake connects at once
        backends.flush()
        self.assertEqual(backends[0].queries(), ["select 1"])
        self.assertTrue(client.received().endswith(m.ready_for_query(b"I")))
        self.assertEqual(relay.state, RelayState.IDLE)
        self.assertEqual(pool.idle, [backends[0].server])

    def test_replies_that_arrive_together_leave_together(self) -> None:
        """Pipelining: a batch's replies that arrive in one read go to the client in one
        write, with and without the prepared-statement layer (which edits the chunk)."""
        for statements in (0, 200):
            relay, client, pool, backends, reactor = relay_setup(max_prepared_statements=statements)
            self.assertEqual(relay.statements is not None, bool(statements))
            batch = (m.query("select 1") + m.query("select 2")
                     + m.parse(b"s1", b"select 3\0\0\0") + m.bind(b"", b"s1", b"\0\0\0\0\0\0")
                     + m.message(b"E", b"\0\0\0\0\0") + m.sync())
            attached(relay, reactor, backends, batch)
            self.assertEqual(len(client.writes), 1, client.writes)
            self.assertTrue(client.writes[0].endswith(m.ready_for_query(b"I")))
            self.assertEqual(client.writes[0].count(m.ready_for_query(b"I")), 3)

    def test_stays_attached_inside_a_transaction(self) -> None:
        """A server stays attached until the transaction ends."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("BEGIN"))
        self.assertEqual(relay.state, RelayState.ATTACHED)
        relay.clientData(m.query("COMMIT"))
        backends.flush()
        self.assertEqual(relay.state, RelayState.IDLE)
        self.assertEqual(pool.idle, [backends[0].server])

    def test_session_mode_never_detaches(self) -> None:
        """In session mode the server stays attached after ReadyForQuery 'I'."""
        relay, client, pool, backends, reactor = relay_setup(mode="session")
        attached(relay, reactor, backends, m.query("select 1"))
        self.assertEqual(relay.state, RelayState.ATTACHED)
        self.assertEqual(pool.idle, [])

    def test_idle_server_taken_synchronously(self) -> None:
        """A second transaction takes the idle server at once, without waiting."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("select 1"))
        relay.clientData(m.query("select 2"))
        self.assertEqual(relay.state, RelayState.ATTACHED)
        self.assertEqual(len(backends.opened), 1)

    def test_parameters_synced_with_set_first(self) -> None:
        """A client whose parameters differ gets one SET before its query, whose replies
        it never sees."""
        wanted = [(n, "app" if n == "application_name" else v) for n, v in DEFAULT_PARAMS]
        relay, client, pool, backends, reactor = relay_setup(wanted=wanted)
        attached(relay, reactor, backends, m.query("select 1"))
        self.assertEqual(backends[0].queries(), ["SET \"application_name\" TO E'app'", "select 1"])
        self.assertEqual(client.received(), command_complete("SELECT 1") + m.ready_for_query(b"I"))
        self.assertEqual(backends[0].server.params["application_name"], ("application_name", "app"))

    def test_client_encoding_switched_alone_first(self) -> None:
        """A server left in LATIN1 first gets SET client_encoding to UTF8 alone, then the
        other values, with the client's encoding set last."""
        latin = tuple((n, "LATIN1" if n == "client_encoding" else v) for n, v in DEFAULT_PARAMS)
        wanted = [(n, "caf\u00e9" if n == "application_name" else v) for n, v in latin]
        relay, client, pool, backends, reactor = relay_setup(wanted=wanted, params=latin)
        attached(relay, reactor, backends, m.query("select 1"))
        self.assertEqual(backends[0].queries(), [
            "SET client_encoding TO 'UTF8'",
            "SET \"application_name\" TO E'caf\u00e9'; SET \"client_encoding\" TO E'LATIN1'",
            "select 1",
        ])

    def test_pending_bytes_pause_the_client_until_attached(self) -> None:
        """A client that floods while waiting is paused past the bound, and everything
        it sent reaches the server in order once it has one."""
        relay, client, pool, backends, reactor = relay_setup(size=1)
        other_client = FakeClient()
        other = Relay(other_client, pool, dict(relay.wanted), dict(relay.told), 1 << 20)
        attached(other, reactor, backends, m.query("BEGIN"))
        big = m.query("select '" + "x" * (PENDING_LIMIT // 4) + "'")
        for _ in range(5):
            relay.clientData(big)
        self.assertEqual(relay.state, RelayState.WAITING)
        self.assertEqual(client.transport.producerState, "paused")
        other.clientData(m.query("COMMIT"))
        backends.flush()
        reactor.advance(0)
        self.assertEqual(client.transport.producerState, "producing")
        backends.flush()
        self.assertEqual(backends[0].queries()[2:], [big[5:-1].decode()] * 5)

    def test_server_fatal_then_close_gives_one_error(self) -> None:
        """A server's own FATAL is forwarded and the client is dropped without a second one."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("BEGIN"))
        client.received()
        fatal = error("57P01", "terminating connection due to administrator command", "FATAL")
        backends[0].send(fatal)
        backends[0].close()
        self.assertEqual(client.received(), fatal)
        self.assertTrue(client.dropped)
        self.assertEqual(client.errors, [])
        self.assertEqual(pool.total, 0)

    def test_server_gone_without_a_word(self) -> None:
        """A server that closes without an error gives the client one 08006."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("BEGIN"))
        backends[0].close()
        self.assertEqual([e.sqlstate for e in client.errors], ["08006"])
        self.assertFalse(client.dropped)

    def test_terminate_closes_the_client_and_keeps_the_server(self) -> None:
        """Terminate is not forwarded: the client is closed and the server stays pooled."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("select 1"))
        relay.clientData(m.terminate())
        relay.clientGone()
        backends.flush()
        self.assertTrue(client.dropped)
        self.assertNotIn(b"X", backends[0].kinds())
        self.assertEqual(pool.idle, [backends[0].server])


class ExtendedPathTests(SynchronousTestCase):
    """Extended-protocol chunks with prepared statements on: taken in one pass when a
    server is there to rewrite them for, scanned only when they must be."""

    def test_a_bad_chunk_sent_between_transactions_costs_no_server(self) -> None:
        """A chunk with an unknown message type, sent while the client has no server,
        is scanned only once the idle server is attached: the client gets 08P01, none
        of it reaches the server, and the server goes back to the pool."""
        relay, client, pool, backends, reactor = relay_setup(max_prepared_statements=200)
        attached(relay, reactor, backends, m.query("select 1"))
        before = backends[0].kinds()
        relay.clientData(m.message(b"E", b"\0\0\0\0\0") + m.message(b"\x01", b""))
        self.assertEqual([e.sqlstate for e in client.errors], ["08P01"])
        self.assertFalse(relay.stream_cut)
        relay.clientGone()
        backends.flush()
        reactor.advance(0)
        self.assertEqual(backends[0].kinds(), before)
        self.assertEqual(pool.idle, [backends[0].server])

    def test_a_bad_chunk_after_a_message_cut_short_closes_the_server(self) -> None:
        """A bad chunk after one that stopped inside a message (forwarded in part): the
        server's stream stops mid-message, so it is closed rather than cleaned."""
        relay, client, pool, backends, reactor = relay_setup(max_prepared_statements=200)
        attached(relay, reactor, backends, m.query("BEGIN"))
        execute = m.message(b"E", b"\0\0\0\0\0")
        relay.clientData(execute[:3])
        relay.clientData(execute[3:] + m.message(b"\x01", b""))
        self.assertEqual([e.sqlstate for e in client.errors], ["08P01"])
        self.assertTrue(relay.stream_cut)
        relay.clientGone()
        backends.flush()
        reactor.advance(0)
        self.assertEqual(pool.total, 0)

    def test_a_chunk_that_waits_for_a_server_is_scanned_at_once(self) -> None:
        """With no server free, the client's chunk is scanned as it arrives (its next
        chunk continues the scan), and goes out rewritten once a server is there."""
        relay, client, pool, backends, reactor = relay_setup(size=1, max_prepared_statements=200)
        other = Relay(FakeClient(), pool, dict(relay.wanted), dict(relay.told), 1 << 20)
        attached(other, reactor, backends, m.query("BEGIN"))
        batch = (m.parse(b"s1", b"select 3\0\0\0") + m.bind(b"", b"s1", b"\0\0\0\0\0\0")
                 + m.message(b"E", b"\0\0\0\0\0") + m.sync())
        relay.clientData(batch[:20])
        self.assertEqual(relay.state, RelayState.WAITING)
        self.assertIsNotNone(relay.unsent[-1][1])  # scanned
        relay.clientData(batch[20:])
        other.clientData(m.query("COMMIT"))
        backends.flush()
        reactor.advance(0)
        backends.flush()
        self.assertEqual(client.errors, [])
        self.assertTrue(client.received().endswith(m.ready_for_query(b"I")))
        self.assertEqual(backends[0].kinds()[-4:], b"PBES")
        self.assertEqual(relay.state, RelayState.IDLE)

    def test_a_whole_chunk_that_waits_is_checked_and_taken_in_one_pass(self) -> None:
        """With no server free, a chunk of whole messages is only checked as it arrives
        (the scanner is not fed), and goes out through Statements.batch once a server
        is there: the path of most extended-protocol transactions with many clients."""
        relay, client, pool, backends, reactor = relay_setup(size=1, max_prepared_statements=200)
        feeds = counting_feeds(relay)
        other = Relay(FakeClient(), pool, dict(relay.wanted), dict(relay.told), 1 << 20)
        attached(other, reactor, backends, m.query("BEGIN"))
        relay.clientData(m.parse(b"", b"select 3\0\0\0") + m.bind(b"", b"", b"\0\0\0\0\0\0")
                         + m.message(b"D", b"P\0") + m.message(b"E", b"\0\0\0\0\0") + m.sync())
        self.assertEqual(relay.state, RelayState.WAITING)
        self.assertEqual(relay.unsent[-1][1:], (None, False, True))  # checked, not scanned
        other.clientData(m.query("COMMIT"))
        backends.flush()
        reactor.advance(0)
        backends.flush()
        self.assertEqual(feeds, [])
        self.assertEqual(client.errors, [])
        self.assertEqual(backends[0].kinds()[-5:], b"PBDES")
        self.assertTrue(client.received().endswith(m.ready_for_query(b"I")))
        self.assertEqual(relay.state, RelayState.IDLE)

    def test_a_checked_chunk_batch_refuses_is_scanned_on_its_own(self) -> None:
        """A waiting chunk that was only checked, but that Statements.batch refuses (a
        named Parse), is scanned when it is sent by a scanner of its own: the relay's
        has gone on to the client's next chunk, which stopped inside a message."""
        relay, client, pool, backends, reactor = relay_setup(size=1, max_prepared_statements=200)
        other = Relay(FakeClient(), pool, dict(relay.wanted), dict(relay.told), 1 << 20)
        attached(other, reactor, backends, m.query("BEGIN"))
        relay.clientData(m.parse(b"s1", b"select 3\0\0\0") + m.sync())
        self.assertEqual(relay.unsent[-1][1:], (None, False, True))
        execute = m.bind(b"", b"s1", b"\0\0\0\0\0\0") + m.message(b"E", b"\0\0\0\0\0") + m.sync()
        relay.clientData(execute[:7])  # (inside the Bind: scanned, the scanner is left inside it)
        self.assertIsNotNone(relay.unsent[-1][1])
        other.clientData(m.query("COMMIT"))
        backends.flush()
        reactor.advance(0)
        backends.flush()
        relay.clientData(execute[7:])
        backends.flush()
        self.assertEqual(client.errors, [])
        self.assertEqual(backends[0].kinds()[-5:], b"PSBES")
        self.assertEqual(client.received().count(m.ready_for_query(b"I")), 2)
        self.assertEqual(relay.state, RelayState.IDLE)

    def test_a_bad_chunk_that_waits_fails_its_client_at_once(self) -> None:
        """A chunk that breaks the protocol while the client waits for a server fails
        the client as it arrives: it never costs the server it was waiting for."""
        relay, client, pool, backends, reactor = relay_setup(size=1, max_prepared_statements=200)
        other = Relay(FakeClient(), pool, dict(relay.wanted), dict(relay.told), 1 << 20)
        attached(other, reactor, backends, m.query("BEGIN"))
        relay.clientData(m.message(b"E", b"\0\0\0\0\0") + m.message(b"\x01", b""))
        self.assertEqual([e.sqlstate for e in client.errors], ["08P01"])
        relay.clientGone()
        before = backends[0].kinds()
        other.clientData(m.query("COMMIT"))
        backends.flush()
        reactor.advance(0)
        self.assertEqual(backends[0].kinds(), before + b"Q")
        self.assertEqual(pool.idle, [backends[0].server])

    def test_nothing_after_a_bad_waiting_chunk_reaches_the_server(self) -> None:
        """A waiting chunk that only the tracker refuses (a Sync of length 8: the
        scanner's checks pass it) fails the client once a server is attached, and the
        client's later waiting chunks are dropped with it, not run."""
        relay, client, pool, backends, reactor = relay_setup(size=1, max_prepared_statements=200)
        other = Relay(FakeClient(), pool, dict(relay.wanted), dict(relay.told), 1 << 20)
        attached(other, reactor, backends, m.query("BEGIN"))
        relay.clientData(m.parse(b"", b"select 3\0\0\0") + m.message(b"S", b"\0\0\0\0"))
        relay.clientData(m.query("update t set x = 1"))
        before = backends[0].kinds()
        other.clientData(m.query("COMMIT"))
        backends.flush()
        reactor.advance(0)
        self.assertEqual([e.sqlstate for e in client.errors], ["08P01"])
        self.assertEqual(backends[0].kinds(), before + b"Q")
        self.assertEqual(backends[0].queries()[-1], "COMMIT")

    def test_nothing_after_a_waiting_terminate_reaches_the_server(self) -> None:
        """Requests a client sent after its Terminate, all waiting for a server, end
        with it: what came before goes out, what came after never runs."""
        relay, client, pool, backends, reactor = relay_setup(size=1, max_prepared_statements=200)
        other = Relay(FakeClient(), pool, dict(relay.wanted), dict(relay.told), 1 << 20)
        attached(other, reactor, backends, m.query("BEGIN"))
        relay.clientData(m.parse(b"s1", b"select 1\0\0\0") + m.sync())
        relay.clientData(m.terminate())
        relay.clientData(m.query("delete from t"))
        before = backends[0].kinds()
        other.clientData(m.query("COMMIT"))
        backends.flush()
        reactor.advance(0)
        backends.flush()
        self.assertTrue(client.dropped)
        self.assertEqual(backends[0].kinds(), before + b"QPS")
        self.assertNotIn("delete from t", backends[0].queries())

    def test_every_whole_chunk_that_waits_is_checked(self) -> None:
        """A second whole chunk from a client already waiting is checked too: neither
        is fed to the scanner, and both go out through Statements.batch."""
        relay, client, pool, backends, reactor = relay_setup(size=1, max_prepared_statements=200)
        batches: list[bytes] = []
        batch = relay.statements.batch  # type: ignore[union-attr]

        def counting(data: bytes, max_length: int) -> object:
            taken = batch(data, max_length)
            if taken is not None:
                batches.append(data)
            return taken

        relay.statements.batch = counting  # type: ignore[union-attr,method-assign]
        other = Relay(FakeClient(), pool, dict(relay.wanted), dict(relay.told), 1 << 20)
        attached(other, reactor, backends, m.query("BEGIN"))
        one = m.parse(b"", b"select 3\0\0\0") + m.bind(b"", b"", b"\0\0\0\0\0\0") + m.sync()
        two = m.bind(b"", b"", b"\0\0\0\0\0\0") + m.message(b"E", b"\0\0\0\0\0") + m.sync()
        relay.clientData(one)
        relay.clientData(two)
        self.assertEqual([entry[1:] for entry in relay.unsent], [(None, False, True)] * 2)
        other.clientData(m.query("COMMIT"))
        backends.flush()
        reactor.advance(0)
        backends.flush()
        self.assertEqual(batches, [one, two])
        self.assertEqual(client.errors, [])
        self.assertEqual(backends[0].kinds()[-6:], b"PBSBES")
        self.assertEqual(client.received().count(m.ready_for_query(b"I")), 2)

    def test_an_unnamed_parse_marks_its_server(self) -> None:
        """The text of a Parse taken in one pass is read for session state: a SET of a
        parameter the server does not report marks the server for cleaning."""
        relay, client, pool, backends, reactor = relay_setup(max_prepared_statements=200)
        attached(relay, reactor, backends, m.parse(b"", b"SET statement_timeout = '17s'\0\0\0")
                 + m.bind(b"", b"", b"\0\0\0\0\0\0") + m.message(b"E", b"\0\0\0\0\0") + m.sync())
        self.assertEqual(backends[0].server.left, SETTINGS)

    def test_usual_extended_chunk_is_not_scanned(self) -> None:
        """pgbench's -M prepared transaction, once its statement is on the server, goes
        out renamed without the scanner's events."""
        relay, client, pool, backends, reactor = relay_setup(max_prepared_statements=200)
        attached(relay, reactor, backends, m.parse(b"P0_1", b"select 1\0\0\0") + m.sync())
        feeds = counting_feeds(relay)
        attached(relay, reactor, backends, m.bind(b"", b"P0_1", b"\0\0\0\0\0\0")
                 + m.message(b"E", b"\0\0\0\0\0") + m.sync())
        self.assertEqual(feeds, [])
        self.assertEqual(backends[0].received[-3][0], b"B")
        self.assertTrue(backends[0].received[-3][1].startswith(b"\0ODISSEY_"))
        self.assertTrue(client.received().endswith(m.ready_for_query(b"I")))
        self.assertEqual(relay.state, RelayState.IDLE)


class RelayCancelTests(SynchronousTestCase):
    """Cancels forwarded by the relay: coalesced while one is on its way, settled before
    the server is released, never carried over to the next attachment."""

    def test_cancels_coalesced_until_postgresql_closes(self) -> None:
        """Two cancel requests while the first is on its way open one cancel connection;
        the server goes back only after PostgreSQL closed it and a Sync came back."""
        relay, client, pool, backends, reactor = relay_setup()
        attached(relay, reactor, backends, m.query("select pg_sleep(1)"))
        backend = backends[0]
        first = relay.cancelRequest()
        backend.cancel_line = answer_cancel(reactor)  # connected; PostgreSQL not done yet
        second = relay.cancelRequest()
        self.assertEqual(len(reactor.tcpClients), 0)  # no second cancel connection
        backend.held.pop(0)  # PostgreSQL signals the backend: the query fails
        backend.send(error("57014", "canceling statement due to user request") + m.ready_for_query(b"I"))
        backends.flush()
        self.assertEqual(relay.state, RelayState.IDLE)  # detached, but not released yet
        self.assertEqual(pool.idle, [])
        self.assertFalse(first.called or second.called)
        backend.close_cancel()
        self.assertTrue(first.called and second.called)
        backends.flush()
        self.assertEqual(pool.idle, [backend.server])

    def test_next_attachment_gets_a_cancel_of_its_own(self) -> None:
        """A cancel still on its way when the query ended is not reused for the client's
        next query: that one gets its own cancel connection."""
        relay, client, pool, backends, reactor = relay_setup(size=2)
        attached(relay, reactor, backends, m.query("select pg_sleep(1)"))
        relay.cancelRequest()
        backends[0].accept_cancel(close=False)
        backends.flush()  # the first query ended; its server is settling its cancel
        relay.clientData(m.query("select pg_sleep(1)"))
        reactor.advance(0)
        backends.flush()
        relay.cancelRequest()
        self.assertEqual(len(reactor.tcpClients), 1)  # a new cancel connection for the new query
