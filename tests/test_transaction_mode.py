"""Transaction pooling end to end: sharing, boundaries, parameters, vanishing clients."""

from __future__ import annotations

import random
import socket
import subprocess
import time

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest
from txpostgres import txpostgres

from odissey.pool import PoolKey
from odissey.wire import messages as m
from tests.harness import (
    IntegrationTest, committed, direct, free_port, have, route, send_cancel_request, server_pids, sqlstates,
    Replies, run_seed, trust_login, trust_login_keyed, until, vanish,
)


def tx_route(**pool: object) -> dict:
    return route(pool={"mode": "transaction", **pool})


class TransactionModeTests(IntegrationTest):
    def routes(self) -> list[dict]:
        return [tx_route(size=2)]

    @property
    def pool(self):  # type: ignore[no-untyped-def]
        return self.odissey.service.pools.pools[PoolKey("app", "app")]

    @inlineCallbacks
    def test_idle_clients_hold_no_server(self):
        """Ten logged-in, idle transaction-mode clients hold zero server connections."""
        conns = yield gatherResults([self.thread(self.odissey.connect) for _ in range(10)])
        try:
            yield gatherResults([self.thread(lambda c=c: c.execute("select 1").close()) for c in conns])
            self.assertEqual(len(self.pool.active), 0)
            self.assertLessEqual(self.pool.total, 2)
            for _ in range(50):  # an earlier test's backends may still be exiting
                backends = yield self.thread(server_pids)
                if len(backends) <= 2:
                    break
                yield deferLater(reactor, 0.1, lambda: None)
            self.assertLessEqual(len(backends), 2)

            def active_backends() -> int:
                with direct() as su:
                    return su.execute("select count(*) from pg_stat_activity where usename = 'app' "
                                      "and state <> 'idle'").fetchone()[0]

            self.assertEqual((yield self.thread(active_backends)), 0)
        finally:
            yield gatherResults([self.thread(c.close) for c in conns])

    @inlineCallbacks
    def test_login_needs_no_server(self):
        """Once the pool has its parameters, a login opens no server connection."""
        yield self.thread(lambda: self.odissey.connect().close())
        before = (self.pool.total, self.pool.opening)
        conn = yield self.thread(self.odissey.connect)
        self.assertEqual((self.pool.total, self.pool.opening), before)
        self.assertEqual(len(self.pool.active), 0)
        yield self.thread(conn.close)

    @inlineCallbacks
    def test_transaction_keeps_its_server(self):
        """Inside a transaction every statement runs on one backend; rows commit once."""
        def run() -> set[int]:
            with self.odissey.connect(autocommit=False) as conn:
                pids = set()
                for i in range(5):
                    pids.add(conn.execute("select pg_backend_pid()").fetchone()[0])
                    conn.execute("insert into items values (%s, 'tx-keep')", (30000 + i,))
                conn.commit()
                return pids

        pids = yield self.thread(run)
        self.assertEqual(len(pids), 1)
        self.assertTrue((yield self.thread(committed, "tx-keep")))
        yield self.thread(lambda: direct().execute("delete from items where note = 'tx-keep'"))

    @inlineCallbacks
    def test_pipeline_with_error_in_the_middle(self):
        """psycopg pipeline mode with a failing statement in the middle: answers stay in order,
        the failed segment is reported, the connection and its server come back clean."""
        def run() -> tuple[list[object], str]:
            with self.odissey.connect() as conn:
                results: list[object] = []
                curs = []
                try:
                    with conn.pipeline() as pipe:
                        curs = [conn.execute("select %s::int", (i,)) for i in range(3)]
                        pipe.sync()
                        conn.execute("select 1/0")
                        pipe.sync()
                        conn.execute("select 99")
                except psycopg.errors.DivisionByZero as exc:
                    results.append(exc.sqlstate)
                results.extend(c.fetchone()[0] for c in curs)
                return results, str(conn.execute("select 'still fine'").fetchone()[0])

        results, tail = yield self.thread(run)
        self.assertEqual(results, ["22012", 0, 1, 2])
        self.assertEqual(tail, "still fine")
        self.assertEqual(len(self.pool.active), 0)

    @inlineCallbacks
    def test_pipeline_end_frees_the_server(self):
        """psycopg ends a pipeline with Sync then Flush: once its results are in, the idle
        client holds no server, and when it leaves the server is reused, not closed."""
        conn = yield self.thread(self.odissey.connect)
        try:
            def pipeline() -> tuple[list[int], int]:
                with conn.pipeline():
                    curs = [conn.execute("select %s::int", (i,)) for i in range(3)]
                    pid = conn.execute("select pg_backend_pid()")
                return [c.fetchone()[0] for c in curs], int(pid.fetchone()[0])

            values, pid = yield self.thread(pipeline)
            self.assertEqual(values, [0, 1, 2])
            self.assertEqual(len(self.pool.active), 0)
        finally:
            yield self.thread(conn.close)
        self.assertIn(pid, (yield self.thread(server_pids)))

    @inlineCallbacks
    def test_copy_error_mid_stream(self):
        """A COPY that fails half-way (bad row) errors cleanly; the connection then works."""
        def run() -> tuple[str, int]:
            with self.odissey.connect() as conn:
                conn.execute("create temp table if not exists c (x int)")
                state = ""
                try:
                    with conn.cursor().copy("copy items (id, note) from stdin") as copy:
                        for i in range(500):
                            copy.write(f"{40000 + i}\tcopy-err\n".encode())
                        copy.write(b"not-a-number\tboom\n")
                        for i in range(500):
                            copy.write(f"{41000 + i}\tcopy-err\n".encode())
                except psycopg.errors.InvalidTextRepresentation as exc:
                    state = exc.sqlstate or ""
                return state, conn.execute("select count(*) from items where note = 'copy-err'").fetchone()[0]

        self.assertEqual((yield self.thread(run)), ("22P02", 0))

    @inlineCallbacks
    def test_copy_in_and_out_in_transaction_mode(self):
        """COPY in (extended protocol) and out both work and release the server."""
        def run() -> int:
            with self.odissey.connect() as conn:
                with conn.cursor() as cur:
                    with cur.copy("copy items (id, note) from stdin") as copy:
                        for i in range(2000):
                            copy.write_row((50000 + i, "copy-tx"))
                    out = 0
                    with cur.copy("copy (select * from items where note = 'copy-tx') to stdout") as copy:
                        for _row in copy.rows():
                            out += 1
                    cur.execute("delete from items where note = 'copy-tx'")
                return out

        self.assertEqual((yield self.thread(run)), 2000)
        self.assertEqual(len(self.pool.active), 0)

    @inlineCallbacks
    def test_randomised_schedules_never_mix_sessions(self):
        """Six clients on two servers run random mixes of statements, transaction blocks,
        pipelines and errors; every answer is the asking client's own, and a transaction
        never changes backend."""
        run = run_seed(self)

        def client(seed: int) -> int:
            rnd = random.Random(f"{run}-{seed}")
            checks = 0
            with self.odissey.connect() as conn:
                for _ in range(25):
                    action = rnd.choice(["simple", "block", "pipeline", "error"])
                    if action == "simple":
                        assert conn.execute("select %s::int", (seed,)).fetchone()[0] == seed
                    elif action == "block":
                        with conn.transaction():
                            pids = {conn.execute("select pg_backend_pid()").fetchone()[0] for _ in range(3)}
                            assert len(pids) == 1, pids
                            assert conn.execute("select %s::text", (f"c{seed}",)).fetchone()[0] == f"c{seed}"
                    elif action == "pipeline":
                        with conn.pipeline():
                            curs = [conn.execute("select %s::int * 1000 + %s", (seed, k)) for k in range(5)]
                        assert [c.fetchone()[0] for c in curs] == [seed * 1000 + k for k in range(5)]
                    else:
                        try:
                            conn.execute("select 1/0")
                        except psycopg.errors.DivisionByZero:
                            pass
                    checks += 1
            return checks

        done = yield gatherResults([self.thread(client, seed) for seed in range(6)])
        self.assertEqual(done, [25] * 6)
        self.assertEqual(len(self.pool.active), 0)


class ParameterIsolationTests(IntegrationTest):
    """Clients with different settings sharing one server each always see their own."""

    def routes(self) -> list[dict]:
        return [tx_route(size=1)]

    SETTINGS = [
        {"TimeZone": "Asia/Tokyo", "DateStyle": "SQL, DMY", "IntervalStyle": "iso_8601",
         "application_name": "alpha", "client_encoding": "LATIN1", "standard_conforming_strings": "off"},
        {"TimeZone": "America/Lima", "DateStyle": "German, DMY", "IntervalStyle": "sql_standard",
         "application_name": "beta", "client_encoding": "UTF8", "standard_conforming_strings": "on"},
    ]

    def options(self, settings: dict[str, str]) -> str:
        return " ".join(f"-c {k}={v.replace(' ', chr(92) + ' ')}" for k, v in settings.items())

    @inlineCallbacks
    def test_each_client_sees_its_own_values(self):
        """Startup options, then SETs that follow the client across servers, interleaved on one server."""
        conns = yield gatherResults([
            self.thread(self.odissey.connect, options=self.options(s)) for s in self.SETTINGS
        ])
        names = list(self.SETTINGS[0])

        def look(conn: psycopg.Connection) -> dict[str, str]:
            row = conn.execute("select " + ", ".join(f"current_setting('{n}')" for n in names)).fetchone()
            return dict(zip(names, row))

        try:
            for _ in range(3):
                for conn, wanted in zip(conns, self.SETTINGS):
                    self.assertEqual((yield self.thread(look, conn)), wanted)
                    self.assertEqual(conn.info.parameter_status("TimeZone"), wanted["TimeZone"])
            yield self.thread(lambda: conns[0].execute("set TimeZone = 'Europe/Paris'").close())
            self.SETTINGS[0]["TimeZone"] = "Europe/Paris"
            for _ in range(2):
                for conn, wanted in zip(conns, self.SETTINGS):
                    self.assertEqual((yield self.thread(look, conn)), wanted)
            pids = yield gatherResults([self.thread(lambda c=c: c.execute("select pg_backend_pid()").fetchone()[0]) for c in conns])
            self.assertEqual(len(set(pids)), 1)  # really one shared server
        finally:
            self.SETTINGS[0]["TimeZone"] = "Asia/Tokyo"
            yield gatherResults([self.thread(c.close) for c in conns])

    @inlineCallbacks
    def test_nothing_sent_when_parameters_match(self):
        """The same client coming back to its server costs no SET; a different one costs one."""
        from odissey.server import ServerConnection

        sent: list[list[str]] = []
        original = ServerConnection.run

        def counting(server: ServerConnection, statements: list[str]):  # type: ignore[no-untyped-def]
            if "BEGIN" not in statements and statements != ["ROLLBACK"]:  # not the login's check
                sent.append(statements)
            return original(server, statements)

        self.patch(ServerConnection, "run", counting)
        alpha = yield self.thread(self.odissey.connect, options=self.options(self.SETTINGS[0]))
        beta = yield self.thread(self.odissey.connect, options=self.options(self.SETTINGS[1]))
        try:
            for _ in range(5):
                yield self.thread(lambda: alpha.execute("select 1").close())
            self.assertEqual(len(sent), 1)  # alpha's first attach only
            yield self.thread(lambda: beta.execute("select 1").close())
            yield self.thread(lambda: alpha.execute("select 1").close())
            self.assertEqual(len(sent), 3)
            # alpha left the server in LATIN1: UTF8 first, alone, then all of beta's
            # differences in one query
            self.assertEqual(sent[1][0], "SET client_encoding TO 'UTF8'")
            self.assertEqual(len(sent[1]), 2)
            self.assertIn("SET \"TimeZone\" TO E'America/Lima'", sent[1][1])
        finally:
            yield self.thread(alpha.close)
            yield self.thread(beta.close)

    @inlineCallbacks
    def test_options_injection_does_not_execute(self):
        """A value crafted to break out of its quotes is a value, never run: a search_path
        that is no valid list is refused at login as PostgreSQL refuses it, and a plain
        parameter is set verbatim."""
        evil = "public'; create table pwned (x int); --"
        escaped = evil.replace(" ", chr(92) + " ")
        with self.assertRaises(psycopg.OperationalError) as direct_refusal:
            direct(options=f"-c search_path={escaped}").close()
        with self.assertRaises(psycopg.OperationalError) as refusal:
            yield self.thread(self.odissey.connect, options=f"-c search_path={escaped}")
        self.assertIn("invalid value for parameter", str(direct_refusal.exception))
        self.assertIn('invalid value for parameter "search_path"', str(refusal.exception))
        conn = yield self.thread(self.odissey.connect, options=f"-c application_name={escaped}")
        try:
            name = yield self.thread(lambda: conn.execute("show application_name").fetchone()[0])
            self.assertIn("pwned", name)

            def pwned() -> int:
                with direct() as su:
                    return su.execute("select count(*) from pg_class where relname = 'pwned'").fetchone()[0]

            self.assertEqual((yield self.thread(pwned)), 0)
        finally:
            yield self.thread(conn.close)

    @inlineCallbacks
    def test_list_setting_from_options_is_a_list(self):
        """options=-csearch_path=a,b gives two schemas, as PostgreSQL itself does."""
        options = "-c search_path=pg_catalog,public"
        look = "select current_setting('search_path'), current_schemas(false)"
        with direct(options=options) as conn:
            expected = conn.execute(look).fetchone()
        self.assertEqual(expected[1], ["pg_catalog", "public"])
        conn = yield self.thread(self.odissey.connect, options=options)
        try:
            self.assertEqual((yield self.thread(lambda: conn.execute(look).fetchone())), expected)
        finally:
            yield self.thread(conn.close)

    @inlineCallbacks
    def test_unreported_setting_does_not_leak(self):
        """A search_path given at startup by one client is reset for another on the same server."""
        a = yield self.thread(self.odissey.connect, options="-c search_path=pg_catalog")
        b = yield self.thread(self.odissey.connect)
        try:
            self.assertEqual((yield self.thread(lambda: a.execute("show search_path").fetchone()[0])), "pg_catalog")
            self.assertEqual((yield self.thread(lambda: b.execute("show search_path").fetchone()[0])),
                             '"$user", public')
        finally:
            yield self.thread(a.close)
            yield self.thread(b.close)


class VanishTests(IntegrationTest):
    """Clients that vanish in transaction mode: rolled back, cancelled, never handed on dirty."""

    def routes(self) -> list[dict]:
        return [tx_route(size=1, reset_timeout="5s")]

    @inlineCallbacks
    def test_idle_in_transaction(self):
        """Gone while idle in a transaction: ROLLBACK, the server is reused, nothing committed."""
        pid = yield self.thread(self.vanish_inside_transaction, 60001, "tx-vanished")
        self.assertEqual((yield self.thread(self.backend_pid)), pid)
        self.assertFalse((yield self.thread(committed, "tx-vanished")))

    @inlineCallbacks
    def test_during_pg_sleep_freed_within_two_seconds(self):
        """Gone during pg_sleep(30): cancelled at once; the server serves the next client within 2 s."""
        def doomed() -> int:
            conn = self.odissey.connect()
            pid = conn.execute("select pg_backend_pid()").fetchone()[0]
            conn.execute("begin")
            conn.execute("insert into items values (60002, 'sleep-vanished')")
            conn.pgconn.send_query(b"select pg_sleep(30)")
            time.sleep(0.3)
            vanish(conn)
            return pid

        pid = yield self.thread(doomed)
        started = time.monotonic()
        self.assertEqual((yield self.thread(self.backend_pid)), pid)
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertFalse((yield self.thread(committed, "sleep-vanished")))

    @inlineCallbacks
    def test_during_large_result(self):
        """Gone while a large result streams: cancelled and drained; the server is reused."""
        pid = yield self.thread(self.vanish_during, b"select repeat('x', 1000) from generate_series(1, 500000)")
        self.assertEqual((yield self.thread(self.backend_pid)), pid)

    @inlineCallbacks
    def test_during_copy_out(self):
        """Gone during COPY TO STDOUT: the server is cleaned and reused."""
        sql = b"copy (select g, repeat('y', 500) from generate_series(1, 400000) g) to stdout"
        pid = yield self.thread(self.vanish_during, sql)
        self.assertEqual((yield self.thread(self.backend_pid)), pid)

    @inlineCallbacks
    def test_during_copy_in(self):
        """Gone during COPY FROM STDIN: no rows land; the server is reused or replaced, never dirty."""
        def doomed() -> None:
            conn = self.odissey.connect()
            copying = conn.cursor().copy("copy items (id, note) from stdin")
            copy = copying.__enter__()  # keep the context manager: dropping it fails the COPY
            for i in range(3000):
                copy.write_row((70000 + i, "copyin-vanished"))
            time.sleep(0.2)
            vanish(conn)

        yield self.thread(doomed)

        def after() -> tuple[int, str]:
            with self.odissey.connect() as conn:
                return (conn.execute("select count(*) from items where note = 'copyin-vanished'").fetchone()[0],
                        conn.execute("select current_setting('transaction_isolation')").fetchone()[0])

        count, _ = yield self.thread(after)
        self.assertEqual(count, 0)
        self.assertEqual(len(self.odissey.service.pools.pools[PoolKey("app", "app")].active), 0)


class ManyClientsTests(IntegrationTest):
    """Hundreds of clients through a handful of servers."""

    def routes(self) -> list[dict]:
        return [tx_route(size=1, wait_timeout="60s"),
                route("bench", "app", server={"database": "app"},
                      pool={"mode": "transaction", "size": 5, "wait_timeout": "60s"})]
    # (the login budget is not under test here: 300 txpostgres logins share the test's
    # reactor with Odissey, and on a loaded machine some look stalled to the budget)
    limits = {"max_clients": 1000, "max_login_clients": 1000}

    @inlineCallbacks
    def test_300_clients_one_server(self):
        """300 concurrent txpostgres clients doing short transactions through pool size 1 all succeed."""
        conns = []

        @inlineCallbacks
        def one(i: int):  # type: ignore[no-untyped-def]
            conn = txpostgres.Connection()
            conns.append(conn)
            yield conn.connect(self.odissey.dsn())

            def tx(cur):  # type: ignore[no-untyped-def]
                d = cur.execute("insert into items values (%s, 'tx300')", (90000 + i,))
                d.addCallback(lambda _: cur.execute("select count(*) from items where id = %s", (90000 + i,)))
                d.addCallback(lambda c: c.fetchone()[0])
                return d

            seen = yield conn.runInteraction(tx)
            conn.close()
            return seen

        try:
            results = yield gatherResults([one(i) for i in range(300)], consumeErrors=True)
        finally:
            for conn in conns:
                if not conn.closed:
                    conn.close()
        self.assertEqual(results, [1] * 300)

        def count() -> int:
            with direct() as su:
                n = su.execute("select count(*) from items where note = 'tx300'").fetchone()[0]
                su.execute("delete from items where note = 'tx300'")
                return n

        self.assertEqual((yield self.thread(count)), 300)
        pool = self.odissey.service.pools.pools[PoolKey("app", "app")]
        self.assertEqual(pool.total, 1)

    @inlineCallbacks
    def test_pgbench_100_clients_pool_5(self):
        """pgbench -c 100 -T 10 through a transaction pool of 5: zero failures, at most 5 backends."""
        if not have("pgbench"):
            raise SkipTest("pgbench not installed")
        peak: list[int] = []

        def watch() -> None:
            deadline = time.monotonic() + 9
            with direct() as su:
                while time.monotonic() < deadline:
                    peak.append(su.execute("select count(*) from pg_stat_activity "
                                           "where application_name = 'pgbench'").fetchone()[0])
                    time.sleep(0.5)

        def bench() -> subprocess.CompletedProcess[str]:
            base = ["-h", "127.0.0.1", "-p", str(self.odissey.port), "-U", "app"]
            return subprocess.run(["pgbench", "-n", "-c", "100", "-j", "4", "-T", "10", *base, "bench"],
                                  capture_output=True, text=True, env=self.odissey.env(), timeout=120)

        watching = self.thread(watch)
        done = yield self.thread(bench)
        yield watching
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        self.assertIn("number of failed transactions: 0 (0.000%)", done.stdout)
        self.assertLessEqual(max(peak), 5)


class WaitTimeoutTests(IntegrationTest):
    def routes(self) -> list[dict]:
        return [tx_route(size=1, wait_timeout="1s")]

    @inlineCallbacks
    def test_wait_timeout_names_pool(self):
        """With the only server held by an open transaction, another client gets 53300 naming the pool."""
        holder = yield self.thread(self.odissey.connect)
        try:
            yield self.thread(lambda: holder.execute("begin").close())
            outcome = yield self.thread(self.query_outcome)
            self.assertTrue(outcome.startswith("53300"), outcome)
            self.assertIn('pool "app/app"', outcome)
        finally:
            yield self.thread(holder.close)


class CrossCancelTests(IntegrationTest):
    """Cancels under load never hit another client's query."""

    def routes(self) -> list[dict]:
        return [tx_route(size=4, wait_timeout="60s")]

    @inlineCallbacks
    def test_no_cross_cancel_under_load(self):
        """100 clients run short sleeps; a third of them cancel their own at random moments.
        Only those that asked for a cancel ever see 57014."""
        run = run_seed(self)

        def client(seed: int) -> tuple[bool, int]:
            rnd = random.Random(f"{run}-{seed}")
            canceller = seed % 3 == 0
            cancelled = 0
            with self.odissey.connect() as conn:
                for _ in range(6):
                    if canceller:
                        conn.pgconn.send_query(b"select pg_sleep(0.05)")
                        time.sleep(rnd.random() * 0.06)
                        conn.cancel_safe()
                        cancelled += sqlstates(conn).count("57014")
                    else:
                        try:
                            conn.execute("select pg_sleep(0.02)")
                        except psycopg.errors.QueryCanceled:
                            cancelled += 1
            return canceller, cancelled

        results = yield gatherResults([self.thread(client, seed) for seed in range(100)])
        innocent = sum(n for canceller, n in results if not canceller)
        self.assertEqual(innocent, 0)
        self.assertGreater(sum(n for canceller, n in results if canceller), 0)  # cancels did work


def extended(sql: str) -> bytes:
    """Parse, Bind and Execute of an unnamed statement, without Sync."""
    return (m.message(b"P", m.cstring("") + m.cstring(sql) + b"\0\0")
            + m.message(b"B", b"\0\0" + b"\0\0" + b"\0\0" + b"\0\0")
            + m.message(b"E", b"\0" + b"\0\0\0\0"))


def pieces(sock: socket.socket, rnd: random.Random, data: bytes) -> None:
    """Send ``data`` in up to three random pieces, with short pauses between them."""
    cuts = sorted(rnd.randrange(len(data) + 1) for _ in range(rnd.randrange(3)))
    for start, end in zip([0, *cuts], [*cuts, len(data)]):
        if end > start:
            sock.sendall(data[start:end])
            if end < len(data):
                time.sleep(rnd.random() * 0.005)


class UnsyncedBatchTests(IntegrationTest):
    """Extended-protocol messages sent after a Sync belong to the client that sent them:
    the server stays attached until they are synced too, and is never reused with them."""

    def routes(self) -> list[dict]:
        return [route("app", "u_trust", auth={"method": "trust"},
                      pool={"mode": "transaction", "size": 1, "wait_timeout": "20s"})]

    @inlineCallbacks
    def test_next_batch_keeps_the_server(self):
        """A sends one synced batch and, before its ReadyForQuery, an unsynced INSERT. B,
        asking for the only server meanwhile, waits for A's Sync instead of receiving A's
        replies, and A's INSERT is answered to A and committed once."""
        a = yield self.thread(trust_login, self.odissey.port)
        replies = Replies(a)
        try:
            a.sendall(extended("select 1") + m.sync() + extended("insert into items values (62000, 'unsynced')"))
            first = yield self.thread(replies.until, 1)
            self.assertIn(b"C\0\0\0\rSELECT 1\0", first)

            def other() -> int:
                with self.odissey.connect(user="u_trust", password=None) as conn:
                    return int(conn.execute("select 2").fetchone()[0])

            b = self.thread(other)
            yield deferLater(reactor, 0.5, lambda: None)
            self.assertFalse(b.called)  # the only server still belongs to A
            a.sendall(m.sync())
            second = yield self.thread(replies.until, 2)
            self.assertTrue(second.startswith(b"1\0\0\0\4" + b"2\0\0\0\4"), second)
            self.assertIn(b"INSERT 0 1\0", second)
            self.assertEqual((yield b), 2)
            self.assertTrue((yield self.thread(committed, "unsynced")))
        finally:
            a.close()
            yield self.thread(lambda: direct().execute("delete from items where id = 62000").connection.close())

    @inlineCallbacks
    def test_vanished_with_unsynced_insert(self):
        """A client that vanishes after an unsynced INSERT: nothing is committed (the
        server is closed, not handed on with the INSERT pending), and the pool serves on."""
        a = yield self.thread(trust_login, self.odissey.port)
        replies = Replies(a)
        a.sendall(m.query("select 1"))
        yield self.thread(replies.until, 1)
        a.sendall(m.query("select 1") + extended("insert into items values (62001, 'unsynced-gone')"))
        yield self.thread(replies.until, 2)
        a.close()

        def other() -> int:
            with self.odissey.connect(user="u_trust", password=None) as conn:
                return int(conn.execute("select 3").fetchone()[0])

        self.assertEqual((yield self.thread(other)), 3)
        self.assertFalse((yield self.thread(committed, "unsynced-gone")))


class WireScheduleTests(IntegrationTest):
    """Raw-protocol clients with random schedules: what libpq never does, a client may."""

    def routes(self) -> list[dict]:
        return [route("app", "u_trust", auth={"method": "trust"},
                      pool={"mode": "transaction", "size": 2, "wait_timeout": "30s"})]

    cancels = True  # clients cancel their own queries at random moments
    first_copied_id = 64000  # rows the clients COPY in: ids from here, one range per class

    @inlineCallbacks
    def test_random_wire_schedules_never_mix_sessions(self):
        """Six clients on two servers send simple queries, extended batches, transaction
        blocks, errors and cancels of their own queries, often pipelined before reading
        earlier answers, in random pieces; six more leave at random moments in six ways
        (vanishing with work in flight, Terminate mid-transaction, a forbidden message). Each survivor gets exactly its own rows in order and only its own
        errors, nothing a vanished client sent is committed, and both servers come back."""
        port = self.odissey.port
        run = run_seed(self)

        def client(seed: int, vanish_at: int | None) -> int:
            rnd = random.Random(f"{run}-{seed}")
            sock, key = trust_login_keyed(port)
            reader = Replies(sock)
            sent: list[tuple[str, bool]] = []  # (token, may be cancelled) in reply order
            requests = errors = copied = bad_copies = 0
            done: list[str] = []  # the actions, for the failure message
            try:
                for step in range(40):
                    token = f"{seed}-{step}"
                    if step == vanish_at:
                        doomed = [m.query("begin") + m.query(f"insert into items values ({63000 + seed}, 'wire-vanished')"),
                                  extended(f"insert into items values ({63100 + seed}, 'wire-vanished')"),
                                  m.query("begin") + extended("select pg_sleep(5)") + m.sync(),
                                  m.query("copy items (id, note) from stdin")  # cut inside a CopyData
                                  + m.message(b"d", f"{63200 + seed}\twire-vanished\n".encode())[:-4],
                                  m.query("begin") + m.query(f"insert into items values ({63300 + seed}, 'wire-vanished')")
                                  + m.query("select pg_sleep(0.1)") + m.terminate(),  # goodbye mid-transaction
                                  m.query("begin") + m.query(f"insert into items values ({63400 + seed}, 'wire-vanished')")
                                  + b"Q\xff\xff\xff\xffgarbage"]  # a message length no one may send
                        try:
                            pieces(sock, rnd, doomed[seed % len(doomed)])
                        except (BrokenPipeError, ConnectionResetError):
                            pass  # Odissey closed on the forbidden length before the last piece
                        time.sleep(rnd.random() * 0.05)
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:  # Odissey already closed it (the forbidden message)
                            pass
                        return 0
                    kinds = ["simple", "extended", "block", "error", "split-batch", "copy-out", "copy-in",
                             "copy-in-extended", "multi", "failed-block", "bare-sync", "empty", "copy-bad",
                             "large", "set", "set-apart"] + ["cancel"] * self.cancels
                    kind = rnd.choice(kinds)
                    done.append(kind)
                    note = "wire-copy" if vanish_at is None else "wire-copy-vanisher"  # may land or not
                    row = m.message(b"d", f"{self.first_copied_id + seed * 100 + step}\t{note}\n".encode()) + m.message(b"c")
                    if kind == "simple":
                        data = m.query(f"select '{token}'")
                        sent.append((token, False))
                        requests += 1
                    elif kind == "extended":
                        data = extended(f"select '{token}'") + m.sync()
                        sent.append((token, False))
                        requests += 1
                    elif kind == "block":
                        data = m.query("begin") + extended(f"select '{token}'") + m.sync() + m.query("commit")
                        sent.append((token, False))
                        requests += 3
                    elif kind == "copy-out":
                        data = m.query(f"copy (select '{token}') to stdout")
                        sent.append((token, False))
                        requests += 1
                    elif kind == "copy-in":  # the rows follow the Query at once, as psql sends them
                        data = m.query("copy items (id, note) from stdin") + row
                        copied += 1
                        requests += 1
                    elif kind == "copy-in-extended":  # libpq: a Sync PostgreSQL ignores in copy mode
                        data = extended("copy items (id, note) from stdin") + m.sync() + row + m.sync()
                        copied += 1
                        requests += 1
                    elif kind == "set":  # a reported setting follows the client to any server
                        data = (m.query(f"set application_name = 'app{token}'")
                                + m.query("select current_setting('application_name')"))
                        sent.append((f"app{token}", False))
                        requests += 2
                    elif kind == "set-apart":  # ... also when asked for in a later write
                        reader.until(requests)
                        pieces(sock, rnd, m.query(f"set application_name = 'app{token}'"))
                        reader.until(requests + 1)
                        time.sleep(rnd.random() * 0.01)
                        data = m.query("select current_setting('application_name')")
                        sent.append((f"app{token}", False))
                        requests += 2
                    elif kind == "multi":  # one Query, three statements, the middle one fails
                        data = m.query(f"select '{token}'; select 1/0; select 'never'")
                        sent.append((token, False))
                        requests += 1
                        errors += 1
                    elif kind == "failed-block":
                        data = m.query("begin") + m.query("select 1/0") + m.query("rollback")
                        requests += 3
                        errors += 1
                    elif kind == "bare-sync":
                        data = m.sync()
                        requests += 1
                    elif kind == "empty":
                        data = m.query("")
                        requests += 1
                    elif kind == "copy-bad":  # PostgreSQL fails the COPY on its first row
                        data = (m.query("copy items (id, note) from stdin")
                                + m.message(b"d", b"not-a-number\tx\n") + m.message(b"c"))
                        requests += 1
                        bad_copies += 1
                    elif kind == "large":  # a row far bigger than one read
                        data = extended(f"select '{token}', repeat('x', 300000)") + m.sync()
                        sent.append((token, False))
                        requests += 1
                    elif kind == "error":
                        data = extended("select 1/0") + extended("select 'skipped'") + m.sync()
                        requests += 1
                        errors += 1
                    elif kind == "cancel":  # alone in flight, so it can only hit this query
                        reader.until(requests)
                        pieces(sock, rnd, m.query(f"select '{token}', pg_sleep(0.05)"))
                        sent.append((token, True))
                        requests += 1
                        time.sleep(rnd.random() * 0.06)
                        send_cancel_request(port, key)
                        reader.until(requests)
                        continue
                    else:  # a batch whose Sync comes only with the next write
                        data = extended(f"select '{token}'")
                        sent.append((token, False))
                        pieces(sock, rnd, data)
                        time.sleep(rnd.random() * 0.01)
                        data = m.sync()
                        requests += 1
                    pieces(sock, rnd, data)
                    if rnd.random() < 0.5:  # otherwise keep pipelining
                        reader.until(requests)
                reader.until(requests)
                kept = set(reader.rows)
                cancelled = [token for token, optional in sent if optional and token not in kept]
                assert reader.rows == [token for token, _ in sent if token not in cancelled], (type(self).__name__, reader.rows, sent, done, reader.errors)
                expected = ["22012"] * errors + ["22P02"] * bad_copies + ["57014"] * len(cancelled)
                assert sorted(reader.errors) == sorted(expected), (reader.errors, expected, done)
                return copied
            finally:
                sock.close()

        vanish_at = random.Random(run)
        plans = [(seed, None) for seed in range(6)] + [(seed, vanish_at.randrange(30)) for seed in range(6, 12)]
        copied = yield gatherResults([self.thread(client, seed, at) for seed, at in plans])
        pool = self.odissey.service.pools.pools[PoolKey("app", "u_trust")]
        # the vanished clients' servers are cleaned (a cancel, a ROLLBACK)
        yield until(lambda: not pool.active, 5, "every server is back")
        self.assertEqual(len(pool.active), 0)
        def vanished_rows() -> list[int]:
            with direct() as su:
                return [r[0] for r in su.execute("select id from items where note = 'wire-vanished'")]

        self.assertEqual((yield self.thread(vanished_rows)), [])

        def copied_rows() -> int:
            with direct() as su:
                n = su.execute("select count(*) from items where note = 'wire-copy'").fetchone()[0]
                su.execute("delete from items where note like 'wire-copy%'")
                return int(n)

        self.assertEqual((yield self.thread(copied_rows)), sum(copied))

        def served() -> int:
            with self.odissey.connect(user="u_trust", password=None) as conn:
                return int(conn.execute("select 11").fetchone()[0])

        self.assertEqual((yield self.thread(served)), 11)


class SessionWireScheduleTests(WireScheduleTests):
    """The same schedules in session mode, three servers for eight clients: each session's
    server is reset (or closed) after it, vanished ones included, before the next. No
    cancels: in session mode, as with PostgreSQL itself, a cancel that arrives late may
    hit the same session's next query."""

    cancels = False
    first_copied_id = 66000

    def routes(self) -> list[dict]:
        return [route("app", "u_trust", auth={"method": "trust"},
                      pool={"mode": "session", "size": 3, "wait_timeout": "60s"})]


class ChurningWireScheduleTests(WireScheduleTests):
    """The same schedules while servers churn: a reset after every transaction, and
    server connections that live half a second (closed when next idle, then reopened)."""

    first_copied_id = 68000

    def routes(self) -> list[dict]:
        return [route("app", "u_trust", auth={"method": "trust"},
                      pool={"mode": "transaction", "size": 2, "wait_timeout": "30s",
                            "reset_after_transaction": True, "server_lifetime": "500ms"})]


class CancelWhileWaitingTests(IntegrationTest):
    def routes(self) -> list[dict]:
        return [tx_route(size=1, wait_timeout="30s")]

    @inlineCallbacks
    def test_cancel_reaches_query_once_it_has_a_server(self):
        """A query cancelled while it waits for the pool's only server is cancelled as soon
        as it gets one, instead of running its 20 s; the holder's transaction is untouched."""
        holder = yield self.thread(self.odissey.connect)
        waiter = yield self.thread(self.odissey.connect)
        try:
            yield self.thread(lambda: holder.execute("begin").close())
            holder_pid = yield self.thread(lambda: holder.execute("select pg_backend_pid()").fetchone()[0])

            pools = self.odissey.service.pools.pools.values()
            yield self.thread(lambda: waiter.pgconn.send_query(b"select pg_sleep(20)"))
            yield until(lambda: sum(len(pool.waiters) for pool in pools) == 1, 10, "the query waits for the server")

            def cancel_while_waiting() -> tuple[str, float]:
                # (cancel_safe returns once Odissey has closed the cancel connection:
                # by then the waiting query is marked to be cancelled)
                waiter.cancel_safe()
                holder.execute("commit")  # frees the only server
                started = time.monotonic()
                states = sqlstates(waiter)
                return "".join(states) or "ran to the end", time.monotonic() - started

            outcome, elapsed = yield self.thread(cancel_while_waiting)
            self.assertEqual(outcome, "57014")
            self.assertLess(elapsed, 5)
            again = yield self.thread(lambda: waiter.execute("select pg_backend_pid()").fetchone()[0])
            self.assertEqual(again, holder_pid)  # the one server, reused after the cancel
            self.assertEqual((yield self.thread(lambda: holder.execute("select 7").fetchone()[0])), 7)
        finally:
            yield self.thread(holder.close)
            yield self.thread(waiter.close)


class TimeoutTests(IntegrationTest):
    def routes(self) -> list[dict]:
        return [
            tx_route(size=1, query_timeout="1s", idle_in_transaction_timeout="1s"),
            route("app", "u_trust", auth={"method": "trust"},
                  pool={"mode": "transaction", "client_idle_timeout": "1s"}),
        ]

    @inlineCallbacks
    def test_query_timeout_cancels(self):
        """A query silent past query_timeout is cancelled; the connection stays usable."""
        def run() -> tuple[str, float, int]:
            with self.odissey.connect() as conn:
                started = time.monotonic()
                try:
                    conn.execute("select pg_sleep(10)")
                    state = "finished"
                except psycopg.errors.QueryCanceled as exc:
                    state = exc.sqlstate or ""
                return state, time.monotonic() - started, conn.execute("select 1").fetchone()[0]

        state, elapsed, after = yield self.thread(run)
        self.assertEqual((state, after), ("57014", 1))
        self.assertLess(elapsed, 3)

    @inlineCallbacks
    def test_idle_in_transaction_timeout(self):
        """A client idle inside a transaction is dropped with 25P03; its row rolls back; the server is reused."""
        def run() -> tuple[str, int]:
            conn = self.odissey.connect()
            conn.execute("begin")
            conn.execute("insert into items values (61000, 'idle-tx')")
            pid = conn.execute("select pg_backend_pid()").fetchone()[0]
            time.sleep(2.0)
            try:
                conn.execute("select 1")
                state = "alive"
            except psycopg.Error as exc:
                state = exc.sqlstate or str(exc)
            conn.close()
            return state, pid

        state, pid = yield self.thread(run)
        self.assertEqual(state, "25P03")
        self.assertFalse((yield self.thread(committed, "idle-tx")))

        self.assertEqual((yield self.thread(self.backend_pid)), pid)

    @inlineCallbacks
    def test_client_idle_timeout(self):
        """An idle client is dropped with 57P05."""
        def run() -> str:
            conn = self.odissey.connect(user="u_trust", password=None)
            conn.execute("select 1")
            time.sleep(2.0)
            try:
                conn.execute("select 1")
            except psycopg.Error as exc:
                return exc.sqlstate or str(exc)
            return "alive"

        self.assertEqual((yield self.thread(run)), "57P05")

    @inlineCallbacks
    def test_execute_with_flush_is_not_idle(self):
        """A client waiting on Execute + Flush (no Sync yet) has a query running, not an
        idle session: the client idle timeout leaves it alone."""
        def run() -> list[str]:
            sock = trust_login(self.odissey.port)
            try:
                replies = Replies(sock)
                sock.sendall(extended("select 'done', pg_sleep(2.5)") + m.message(b"H"))
                time.sleep(3.0)
                sock.sendall(m.sync())
                replies.until(1)
                return replies.rows
            finally:
                sock.close()

        self.assertEqual((yield self.thread(run)), ["done"])


class ResetAfterTransactionTests(IntegrationTest):
    def routes(self) -> list[dict]:
        return [tx_route(size=1, reset_after_transaction=True)]

    @inlineCallbacks
    def test_session_state_never_leaks(self):
        """With reset_after_transaction, an unreported SET by one client is gone for the next."""
        a = yield self.thread(self.odissey.connect)
        b = yield self.thread(self.odissey.connect)
        try:
            yield self.thread(lambda: a.execute("set work_mem = '13MB'").close())
            self.assertNotEqual((yield self.thread(lambda: b.execute("show work_mem").fetchone()[0])), "13MB")
        finally:
            yield self.thread(a.close)
            yield self.thread(b.close)


class StorageDownTests(IntegrationTest):
    def routes(self) -> list[dict]:
        return [route(pool={"mode": "transaction"})]

    storage_port = free_port()  # nothing listens here

    @inlineCallbacks
    def test_clear_error_not_a_hang(self):
        """With the storage down, logins fail fast with a clear 08006, then back-off errors."""
        def attempt() -> tuple[str, float]:
            started = time.monotonic()
            try:
                self.odissey.connect().close()
            except psycopg.OperationalError as exc:
                return str(exc), time.monotonic() - started
            return "accepted", 0.0

        first, elapsed = yield self.thread(attempt)
        self.assertIn('could not connect to server "pg"', first)
        self.assertLess(elapsed, 3)
        # The first back-off is 0.25 s and doubles: on a loaded machine a login may land
        # after a window has closed (and fail like the first), but one lands inside one.
        later = []
        for _ in range(6):
            answer, elapsed = yield self.thread(attempt)
            self.assertLess(elapsed, 3)
            later.append(answer)
            if "next attempt in" in answer:
                break
        self.assertIn("next attempt in", later[-1], later)


class MinSizeTests(IntegrationTest):
    def routes(self) -> list[dict]:
        return [route("app", "u_trust", auth={"method": "trust"},
                      pool={"mode": "transaction", "size": 5, "min_size": 3})]

    @inlineCallbacks
    def test_min_size_kept_warm(self):
        """min_size server connections are opened before any client asks."""
        for _ in range(30):
            backends = yield self.thread(server_pids, "u_trust")
            if len(backends) >= 3:
                break
            yield deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(backends), 3)
