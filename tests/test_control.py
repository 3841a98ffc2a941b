"""The console's pool-control commands: through a ConsoleSession fed bytes (the
refusals, who may run them, what they change), and against the real PostgreSQL through
psql, psycopg and pgbench."""

from __future__ import annotations

import subprocess
from typing import Any

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from odissey.console import ADMIN, STATS, ConsoleSession
from odissey.control import Control
from odissey.wire import messages as m
from tests.harness import committed, have, login_outcome, route, server_pids, until
from tests.test_console import ConsoleTest, FakeConsoleClient, SessionHarness


class CommandTests(SessionHarness, SynchronousTestCase):
    """The commands run by a ConsoleSession over pools with fake servers."""

    def test_resume_during_pause_ends_it_with_an_error(self) -> None:
        """RESUME from another session while PAUSE waits: the PAUSE gets 57014."""
        waiting = self.session()
        resumed: list[bytes] = []
        resuming = ConsoleSession(waiting.console, ADMIN, resumed.append, self.closed.append,
                                  lambda: None, "c2")
        pool = self.pools.get(self.route, "db", "u")
        pool.wait("c9")
        self.servers.succeed_next()
        waiting.data(m.query("PAUSE"))
        self.assertEqual(self.written, [])
        resuming.data(m.query("RESUME"))
        self.assertEqual(self.kinds(), "EZ")
        self.assertEqual(self.sqlstates(), ["57014"])
        self.assertEqual(b"".join(resumed), m.command_complete(b"RESUME") + m.ready_for_query(b"I"))

    def test_control_errors(self) -> None:
        """Each refusal carries its SQLSTATE and PgBouncer's words."""
        session = self.session()
        for sql in ("RESUME", "PAUSE nope", "PAUSE pgbouncer", "DISABLE", "KILL_CLIENT x",
                    "KILL_CLIENT 999", "PAUSE; PAUSE db", "RESUME db", "PAUSE db extra"):
            session.data(m.query(sql))
        self.assertEqual(self.sqlstates(),
                         ["55000", "3D000", "0A000", "42601", "42601", "42704", "55000", "55000",
                          "42601"])
        messages = [m.parse_error_fields(body)["M"] for kind, body in self.replies() if kind == "E"]
        self.assertEqual(messages[:7], [
            "pooler is not paused/suspended", "no such database: nope",
            "cannot pause admin db: pgbouncer", "a database is required",
            "invalid client pointer supplied", "client not found", "already suspended/paused"])

    def test_stats_user_may_not_control(self) -> None:
        """Every control command is 42501 for a stats user, and changes nothing."""
        session = self.session(STATS)
        for verb in Control.COMMANDS:
            session.data(m.query(f"{verb} db"))
        self.assertEqual(self.sqlstates(), ["42501"] * len(Control.COMMANDS))
        self.assertEqual((self.pools.paused, self.pools.disabled), (set(), set()))

    def test_kill_client_by_either_id(self) -> None:
        """KILL_CLIENT takes the id column (17) or the logs' id (c17) and fails exactly
        that client with 57P01."""
        session = self.session()
        self.clients.extend([FakeConsoleClient(17), FakeConsoleClient(18)])
        session.data(m.query("KILL_CLIENT 17"))
        session.data(m.query("kill_client c18"))
        self.assertEqual(self.kinds(), "CZCZ")
        self.assertEqual([[e.sqlstate for e in c.failed] for c in self.clients], [["57P01"], ["57P01"]])

    def test_kill_database(self) -> None:
        """KILL db drops that database's clients (not other databases', not the
        console's) and servers, and leaves it paused."""
        session = self.session()
        mine, other, admin = FakeConsoleClient(1), FakeConsoleClient(2, "other"), FakeConsoleClient(3, "odissey")
        self.clients.extend([mine, other, admin])
        pool = self.pools.get(self.route, "db", "u")
        pool.wait("c1")
        server = self.servers.succeed_next()
        session.data(m.query("KILL db"))
        self.assertEqual(self.kinds(), "CZ")
        self.assertEqual([len(c.failed) for c in (mine, other, admin)], [1, 0, 0])
        self.assertEqual(server.state.value, "closed")
        self.assertTrue(self.pools.is_paused("db"))

    def test_show_databases_paused_and_disabled(self) -> None:
        """SHOW DATABASES's last two columns follow PAUSE/RESUME and DISABLE/ENABLE."""
        session = self.session()

        def flags() -> list[tuple[bytes | None, bytes | None]]:
            self.written.clear()
            session.data(m.query("SHOW DATABASES"))
            rows = [m.parse_data_row(body) for kind, body in self.replies() if kind == "D"]
            return [(row[-2], row[-1]) for row in rows]

        self.assertEqual(flags(), [(b"0", b"0"), (b"0", b"0")])
        session.data(m.query("PAUSE db; DISABLE other"))
        self.assertEqual(flags(), [(b"1", b"0"), (b"0", b"1")])
        session.data(m.query("RESUME db; ENABLE other"))
        self.assertEqual(flags(), [(b"0", b"0"), (b"0", b"0")])


class ControlTests(ConsoleTest):
    """PAUSE, RESUME, KILL, KILL_CLIENT, RECONNECT, WAIT_CLOSE, DISABLE and ENABLE
    against the real PostgreSQL, through psql and psycopg."""

    def routes(self) -> list[dict[str, Any]]:
        return [
            route("app", "app", pool={"mode": "transaction", "size": 2}),
            route("sess", "app", server={"database": "app"}, pool={"mode": "session", "size": 2}),
            route("bench", "app", server={"database": "app"},
                  pool={"mode": "transaction", "size": 4, "wait_timeout": "60s"}),
            route("app", "u_clear", auth={"method": "cleartext", "password": "clear-pw"}),
            route("app", "u_trust", auth={"method": "trust"}, server={"password": "trust-pw"}),
        ]

    def pid(self, conn: psycopg.Connection) -> int:
        return int(conn.execute("select pg_backend_pid()").fetchone()[0])  # type: ignore[index]

    def waiting(self, database: str) -> int:
        return sum(len(pool.waiters) for pool in self.odissey.service.pools.of(database))

    @inlineCallbacks
    def test_pause_under_pgbench_then_resume(self):
        """pgbench (tpcb-like transactions, 8 clients, a transaction pool of 4): PAUSE
        answers once no server of the database is left open; then every pgbench client
        waits, none is refused; after RESUME pgbench ends with zero failed transactions."""
        if not have("pgbench"):
            raise SkipTest("pgbench not installed")
        pools = self.odissey.service.pools

        def bench() -> subprocess.CompletedProcess[str]:
            base = ["-h", "127.0.0.1", "-p", str(self.odissey.port), "-U", "app"]
            return subprocess.run(["pgbench", "-n", "-c", "8", "-j", "2", "-T", "8", *base, "bench"],
                                  capture_output=True, text=True, env=self.odissey.env(), timeout=120)

        running = self.thread(bench)
        yield until(lambda: any(pool.active for pool in pools.of("bench")), 30, "pgbench at work")
        tag = yield self.thread(self.admin, "PAUSE bench")
        self.assertEqual(tag, "PAUSE")
        self.assertEqual([(pool.total, pool.pause_state.value) for pool in pools.of("bench")],
                         [(0, "paused")])
        yield until(lambda: self.waiting("bench") == 8, 30, "every pgbench client waiting")
        rows = yield self.thread(self.show, "POOLS")
        bench_pool = next(r for r in rows if r["database"] == "bench")
        self.assertEqual((bench_pool["cl_waiting"], bench_pool["sv_active"], bench_pool["sv_idle"]),
                         (8, 0, 0))
        databases = yield self.thread(self.show, "DATABASES")
        self.assertEqual({r["name"]: r["paused"] for r in databases}, {"app": 0, "sess": 0, "bench": 1})
        self.assertFalse(running.called)
        tag = yield self.thread(self.admin, "RESUME bench")
        self.assertEqual(tag, "RESUME")
        done = yield running
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        self.assertIn("number of failed transactions: 0 (0.000%)", done.stdout)

    @inlineCallbacks
    def test_pause_waits_for_an_open_transaction(self):
        """PAUSE does not answer while a client is inside a transaction; it does once
        the client commits. The client's next query then waits (SHOW CLIENTS: waiting),
        is not refused, and after RESUME runs on a new backend (PAUSE closed the old)."""
        conn = yield self.thread(self.odissey.connect, dbname="bench")
        try:
            yield self.thread(conn.execute, "begin")
            before = yield self.thread(self.pid, conn)
            paused = self.thread(self.admin, "PAUSE bench")
            yield deferLater(reactor, 1.0, lambda: None)  # (to see that it has not answered)
            self.assertFalse(paused.called)
            yield self.thread(conn.execute, "commit")
            yield paused
            query = self.thread(self.pid, conn)
            yield until(lambda: self.waiting("bench") == 1, 10, "the query waiting")
            clients = yield self.thread(self.show, "CLIENTS")
            self.assertEqual([r["state"] for r in clients if r["database"] == "bench"], ["waiting"])
            self.assertNotIn(before, (yield self.thread(server_pids)))
            yield self.psql("RESUME bench", dbname="odissey")
            after = yield query
            self.assertNotEqual(after, before)
        finally:
            yield self.thread(conn.close)

    @inlineCallbacks
    def test_pause_in_session_mode_waits_for_the_session(self):
        """Session mode: PAUSE answers only once the session holding a server ends; a
        session that logs in meanwhile waits for its server and gets one after RESUME."""
        session = yield self.thread(self.odissey.connect, dbname="sess")
        before = yield self.thread(self.pid, session)
        paused = self.thread(self.admin, "PAUSE sess")
        yield deferLater(reactor, 1.0, lambda: None)  # (to see that it has not answered)
        self.assertFalse(paused.called)
        yield self.thread(session.close)
        self.assertEqual((yield paused), "PAUSE")
        def new_session_pid() -> int:
            with self.odissey.connect(dbname="sess") as conn:
                return self.pid(conn)

        late = self.thread(new_session_pid)
        yield until(lambda: self.waiting("sess") == 1, 10, "the new session waiting")
        yield self.thread(self.admin, "RESUME sess")
        self.assertNotEqual((yield late), before)

    @inlineCallbacks
    def test_kill_client(self):
        """KILL_CLIENT (psql) with the id SHOW CLIENTS shows drops exactly that client,
        inside its transaction: its next query fails with 57P01, its insert is rolled
        back, another client's work goes on."""
        victim = yield self.thread(self.odissey.connect, application_name="victim")
        bystander = yield self.thread(self.odissey.connect, application_name="bystander")
        try:
            yield self.thread(victim.execute, "begin")
            yield self.thread(victim.execute, "insert into items values (911001, 'killed-client')")
            clients = yield self.thread(self.show, "CLIENTS")
            wanted = next(r["id"] for r in clients if r["application_name"] == "victim")
            done = yield self.psql(f"KILL_CLIENT {wanted}", dbname="odissey")
            self.assertEqual(done.returncode, 0, done.stderr)
            with self.assertRaises(psycopg.OperationalError) as caught:
                yield self.thread(victim.execute, "select 1")
            self.assertIn("administrator command", str(caught.exception))
            self.assertEqual(1, (yield self.thread(lambda: bystander.execute("select 1").fetchone()[0])))
            pools = self.odissey.service.pools.of("app")
            yield until(lambda: not any(c.id == f"c{wanted}" for c in self.odissey.service.factory.clients)
                        and not any(pool.active for pool in pools), 10, "the victim and its transaction gone")
            self.assertFalse((yield self.thread(committed, "killed-client")))
            clients = yield self.thread(self.show, "CLIENTS")
            self.assertEqual(sorted(r["application_name"] for r in clients if r["database"] == "app"),
                             ["bystander"])
        finally:
            yield self.thread(victim.close)
            yield self.thread(bystander.close)

    @inlineCallbacks
    def test_reconnect_gives_new_backends(self):
        """RECONNECT: in transaction mode the next transaction gets a new backend; in
        session mode the session keeps its backend, WAIT_CLOSE answers once the session
        ends, and the next session gets a new one."""
        tx = yield self.thread(self.odissey.connect)
        session = yield self.thread(self.odissey.connect, dbname="sess")
        try:
            tx_before = yield self.thread(self.pid, tx)
            session_before = yield self.thread(self.pid, session)
            done = yield self.psql("RECONNECT", dbname="odissey")
            self.assertEqual(done.returncode, 0, done.stderr)
            tx_after = yield self.thread(self.pid, tx)
            self.assertNotEqual(tx_after, tx_before)
            self.assertEqual((yield self.thread(self.pid, session)), session_before)
            servers = yield self.thread(self.show, "SERVERS")  # (close_needed: to close when free)
            self.assertEqual(sorted((r["database"], r["remote_pid"], r["close_needed"]) for r in servers),
                             [("app", tx_after, 0), ("sess", session_before, 1)])
            closed = self.thread(self.admin, "WAIT_CLOSE sess")
            yield deferLater(reactor, 0.5, lambda: None)  # (to see that it has not answered)
            self.assertFalse(closed.called)
            yield self.thread(session.close)
            self.assertEqual((yield closed), "WAIT_CLOSE")
            again = yield self.thread(self.odissey.connect, dbname="sess")
            try:
                self.assertNotEqual((yield self.thread(self.pid, again)), session_before)
            finally:
                yield self.thread(again.close)
        finally:
            yield self.thread(tx.close)
            yield self.thread(session.close)

    def login(self, dbname: str) -> str:
        try:
            with self.odissey.connect(dbname=dbname) as conn:
                conn.execute("select 1")
        except psycopg.OperationalError as exc:
            return f"{exc.sqlstate} {exc}"
        return "served"

    @inlineCallbacks
    def test_disable_refuses_new_logins_keeps_existing(self):
        """DISABLE app: a new login to app gets 55000 'database "app" is disabled', a
        client already in goes on, other databases are untouched; ENABLE lets logins in."""
        existing = yield self.thread(self.odissey.connect)
        try:
            yield self.thread(self.admin, "DISABLE app")
            refused = yield self.thread(self.login, "app")
            self.assertIn('database "app" is disabled', refused)
            outcome = yield self.thread(login_outcome, self.odissey.port, "u_trust", "app")
            self.assertEqual(outcome, ("55000", 'database "app" is disabled'))
            self.assertEqual((yield self.thread(self.login, "sess")), "served")
            self.assertEqual(1, (yield self.thread(lambda: existing.execute("select 1").fetchone()[0])))
            databases = yield self.thread(self.show, "DATABASES")
            self.assertEqual({r["name"]: r["disabled"] for r in databases}, {"app": 1, "sess": 0, "bench": 0})
            yield self.thread(self.admin, "ENABLE app")
            self.assertEqual((yield self.thread(self.login, "app")), "served")
        finally:
            yield self.thread(existing.close)

    @inlineCallbacks
    def test_kill_database_then_resume(self):
        """KILL app drops app's clients (57P01) and servers at once, not other
        databases'; a client logging in afterwards waits for RESUME, then is served."""
        first = yield self.thread(self.odissey.connect)
        other = yield self.thread(self.odissey.connect, dbname="sess")
        try:
            yield self.thread(first.execute, "select 1")
            tag = yield self.thread(self.admin, "KILL app")
            self.assertEqual(tag, "KILL")
            with self.assertRaises(psycopg.OperationalError) as caught:
                yield self.thread(first.execute, "select 1")
            self.assertEqual(caught.exception.sqlstate, "57P01")
            self.assertEqual([pool.total for pool in self.odissey.service.pools.of("app")], [0])
            self.assertEqual(1, (yield self.thread(lambda: other.execute("select 1").fetchone()[0])))
            late = self.thread(self.login, "app")
            yield until(lambda: self.waiting("app") == 1, 10, "the late client waiting")
            yield self.thread(self.admin, "RESUME app")
            self.assertEqual((yield late), "served")
        finally:
            yield self.thread(first.close)
            yield self.thread(other.close)

    @inlineCallbacks
    def test_stats_user_cannot_pause(self):
        """A stats user's PAUSE (psql) is refused with "admin access needed" and pauses
        nothing."""
        done = yield self.psql("PAUSE", user="u_clear", password="clear-pw", dbname="odissey")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("admin access needed", done.stderr)
        self.assertFalse(self.odissey.service.pools.is_paused("app"))
