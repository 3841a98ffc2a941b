"""The admin console through psql and psycopg: who may log in, what SHOW tells after
real client activity, and the errors (with their SQLSTATEs) for everything else."""

from __future__ import annotations

import shutil
from typing import Any

import psycopg
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from odissey.config import parse
from odissey.console import ADMIN, STATS, Console, ConsoleSession, merge_pools
from odissey.pool import Pools
from odissey.router import Router
from odissey.testing import FakeServers
from odissey.wire import messages as m
from odissey.wire.errors import PoolerError
from odissey.wire.scanner import Scanner
from tests.harness import APP_PASSWORD, IntegrationTest, route

#: PgBouncer 1.25's SHOW POOLS columns, in order, less those Odissey leaves out.
POOLS_COLUMNS = ["database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle",
                 "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode"]


class ConsoleTest(IntegrationTest):
    """What console tests share: app is an admin user, u_clear a stats user."""

    top = {"admin_users": ["app"], "stats_users": ["u_clear"]}

    def console(self, user: str = "app", password: str = APP_PASSWORD,
                dbname: str = "odissey") -> psycopg.Connection:
        """A console connection; ClientCursor speaks the simple query protocol."""
        return psycopg.connect(self.odissey.dsn(user=user, password=password, dbname=dbname),
                               autocommit=True, cursor_factory=psycopg.ClientCursor,
                               connect_timeout=10)

    def show(self, what: str, **kwargs: Any) -> list[dict[str, Any]]:
        with self.console(**kwargs) as conn:
            cur = conn.execute(f"SHOW {what}")
            names = [d.name for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def columns(self, what: str) -> list[str]:
        with self.console() as conn:
            return [d.name for d in conn.execute(f"SHOW {what}").description]

    def psql(self, sql: str, **kwargs: Any) -> Any:
        if shutil.which("psql") is None:
            raise SkipTest("psql is not installed")
        return self.thread(self.odissey.psql, sql, **kwargs)

    def error(self, sql: str, **kwargs: Any) -> psycopg.Error:
        with self.console(**kwargs) as conn:
            try:
                conn.execute(sql)
            except psycopg.Error as exc:
                return exc
        raise AssertionError(f"{sql} did not fail")

    def admin(self, sql: str) -> str:
        """Run one command on its own console connection; its command tag."""
        with self.console() as conn:
            return conn.execute(sql).statusmessage or ""


class ConsoleTests(ConsoleTest):
    def routes(self) -> list[dict[str, Any]]:
        return [
            route("app", "app", pool={"mode": "transaction", "size": 2}),
            route("app", "u_clear", auth={"method": "cleartext", "password": "clear-pw"}),
            route("app", "u_scram", auth={"method": "scram-sha-256", "password": "scram-pw"}),
        ]

    @inlineCallbacks
    def test_psql_show_pools_follows_a_transaction(self):
        """psql's SHOW POOLS shows one client and one server active while a client is
        inside a transaction, and the server idle once it commits."""
        conn = yield self.thread(self.odissey.connect)
        try:
            yield self.thread(conn.execute, "begin")
            yield self.thread(conn.execute, "select 1")
            done = yield self.psql("SHOW POOLS", dbname="odissey")
            self.assertEqual(done.returncode, 0, done.stderr)
            rows = [line.split("|") for line in done.stdout.splitlines()]
            pools = {(r[0], r[1]): dict(zip(POOLS_COLUMNS, r)) for r in rows}
            app = pools[("app", "app")]
            self.assertEqual((app["cl_active"], app["cl_waiting"], app["sv_active"], app["sv_idle"],
                              app["pool_mode"]), ("1", "0", "1", "0", "transaction"))
            yield self.thread(conn.execute, "commit")
            after = yield self.thread(self.show, "POOLS")
            app = next(r for r in after if (r["database"], r["user"]) == ("app", "app"))
            self.assertEqual((app["cl_active"], app["sv_active"], app["sv_idle"]), (1, 0, 1))
        finally:
            yield self.thread(conn.close)

    @inlineCallbacks
    def test_columns_are_pgbouncers(self):
        """SHOW POOLS has PgBouncer's columns in PgBouncer's order (those Odissey can
        fill), and every other SHOW answers with its documented first columns."""
        pools = yield self.thread(self.columns, "POOLS")
        self.assertEqual(pools, POOLS_COLUMNS)
        clients = yield self.thread(self.columns, "CLIENTS")
        self.assertEqual(clients[:9], ["type", "user", "database", "state", "addr", "port",
                                       "local_addr", "local_port", "connect_time"])
        self.assertEqual(clients[-1], "id")
        for what, first in (("SERVERS", "type"), ("DATABASES", "name"), ("USERS", "name"),
                            ("CONFIG", "key"), ("LISTS", "list"), ("ROUTES", "index"),
                            ("VERSION", "version")):
            columns = yield self.thread(self.columns, what)
            self.assertEqual(columns[0], first, what)

    @inlineCallbacks
    def test_clients_and_servers_show_ids(self):
        """SHOW CLIENTS lists a connected client under the id the logs use, linked to
        the server it holds; SHOW SERVERS shows that server with the backend's pid."""
        conn = yield self.thread(self.odissey.connect, application_name="console-test")
        try:
            yield self.thread(conn.execute, "begin")
            pid = (yield self.thread(lambda: conn.execute("select pg_backend_pid()").fetchone()))[0]
            factory = self.odissey.service.factory
            ours = [c for c in factory.clients if c.relay is not None]
            self.assertEqual(len(ours), 1)
            client = ours[0]
            clients = yield self.thread(self.show, "CLIENTS")
            mine = [r for r in clients if r["database"] == "odissey"]
            self.assertEqual([r["state"] for r in mine], ["active"])  # this very SHOW
            row = next(r for r in clients if r["ptr"] == client.id)
            self.assertEqual((row["type"], row["user"], row["database"], row["state"],
                              row["application_name"], row["id"]),
                             ("C", "app", "app", "active", "console-test", int(client.id[1:])))
            self.assertEqual(row["link"], client.relay.server.id)
            servers = yield self.thread(self.show, "SERVERS")
            server = next(r for r in servers if r["ptr"] == row["link"])
            self.assertEqual((server["state"], server["link"], server["remote_pid"]),
                             ("active", client.id, pid))
            yield self.thread(conn.execute, "commit")
            clients = yield self.thread(self.show, "CLIENTS")
            row = next(r for r in clients if r["ptr"] == client.id)
            self.assertEqual((row["state"], row["link"]), ("idle", ""))
        finally:
            yield self.thread(conn.close)

    @inlineCallbacks
    def test_stats_user_may_only_show(self):
        """A stats user reads SHOW POOLS but gets 42501 for PAUSE; an admin gets 0A000
        for SUSPEND (not supported)."""
        rows = yield self.thread(self.show, "POOLS", user="u_clear", password="clear-pw")
        self.assertIsInstance(rows, list)
        refused = yield self.thread(self.error, "PAUSE", user="u_clear", password="clear-pw")
        self.assertEqual(refused.sqlstate, "42501")
        self.assertIn("admin access needed", str(refused))
        coming = yield self.thread(self.error, "SUSPEND")
        self.assertEqual(coming.sqlstate, "0A000")
        done = yield self.psql("RELOAD", user="u_clear", password="clear-pw", dbname="odissey")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("admin access needed", done.stderr)

    @inlineCallbacks
    def test_non_console_user_refused(self):
        """A user in neither admin_users nor stats_users is refused with 28000 after its
        password; a wrong password gets 28P01, as on any route."""
        def login(user: str, password: str) -> str:
            try:
                self.console(user=user, password=password).close()
            except psycopg.OperationalError as exc:
                return str(exc)
            return "logged in"
        refused = yield self.thread(login, "u_scram", "scram-pw")
        self.assertIn('user "u_scram" is not allowed to use the admin console', refused)
        wrong = yield self.thread(login, "app", "wrong")
        self.assertIn("password authentication failed", wrong)
        done = yield self.psql("SHOW POOLS", user="u_scram", password="scram-pw", dbname="odissey")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("not allowed", done.stderr)

    @inlineCallbacks
    def test_unknown_command_lists_commands(self):
        """An unknown command gets 42601 and a hint listing the commands."""
        error = yield self.thread(self.error, "SHOW NONSENSE")
        self.assertEqual(error.sqlstate, "42601")
        self.assertIn("SHOW HELP", str(error))
        self.assertIn("POOLS|CLIENTS|SERVERS", error.diag.message_hint or "")
        error = yield self.thread(self.error, "select 1")
        self.assertEqual(error.sqlstate, "42601")

    @inlineCallbacks
    def test_pgbouncer_alias_and_help(self):
        """The console answers on database pgbouncer too; SHOW HELP is a notice."""
        done = yield self.psql("SHOW VERSION", dbname="pgbouncer")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertTrue(done.stdout.startswith("Odissey "), done.stdout)
        done = yield self.psql("SHOW HELP", dbname="pgbouncer")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("SHOW HELP|VERSION|POOLS", done.stderr)

    @inlineCallbacks
    def test_extended_protocol_refused_session_goes_on(self):
        """An extended-protocol query gets 0A000; the same session then runs a simple query."""
        def run() -> tuple[str, list[Any]]:
            with self.console() as conn:
                try:
                    psycopg.Cursor(conn).execute("SHOW %s", ["LISTS"])  # a Parse: extended
                except psycopg.Error as exc:
                    state = exc.sqlstate or ""
                else:
                    state = "no error"
                return state, conn.execute("SHOW LISTS").fetchall()
        state, rows = yield self.thread(run)
        self.assertEqual(state, "0A000")
        self.assertIn("pools", [r[0] for r in rows])

    @inlineCallbacks
    def test_routes_databases_users(self):
        """SHOW ROUTES, DATABASES and USERS show the configuration and live counts."""
        conn = yield self.thread(self.odissey.connect)
        try:
            routes = yield self.thread(self.show, "ROUTES")
            self.assertEqual([(r["database"], r["user"], r["pool_mode"], r["pool_size"], r["auth"])
                              for r in routes][:2],
                             [("app", "app", "transaction", 2, "scram-sha-256"),
                              ("app", "u_clear", "session", 4, "cleartext")])
            databases = yield self.thread(self.show, "DATABASES")
            self.assertEqual(databases[0]["current_client_connections"], 1)
            users = yield self.thread(self.show, "USERS")
            by_name = {u["name"]: u for u in users}
            self.assertEqual(by_name["app"]["current_client_connections"], 2)  # with the console
        finally:
            yield self.thread(conn.close)


class ConsoleLoginTests(IntegrationTest):
    """Which route's auth a console login goes through: the first naming the user."""

    top = {"admin_users": ["u_trust"], "stats_users": ["u_clear"]}

    def routes(self) -> list[dict[str, Any]]:
        return [
            route("app", "app"),
            route("*", "u_trust", auth={"method": "trust"}, server={"password": "trust-pw"}),
            {**route("app", "u_clear", auth={"method": "cleartext", "password": "clear-pw"}),
             "block": True},
        ]

    def login(self, user: str, password: str) -> str:
        try:
            with psycopg.connect(self.odissey.dsn(user=user, password=password, dbname="pgbouncer"),
                                 autocommit=True, cursor_factory=psycopg.ClientCursor,
                                 connect_timeout=10) as conn:
                return str(conn.execute("SHOW VERSION").fetchone()[0])
        except psycopg.OperationalError as exc:
            return str(exc)

    @inlineCallbacks
    def test_catch_all_database_route_and_block(self):
        """A user served by a database-"*" trust route logs in to the console without a
        password; a stats user whose route is blocked is refused after its password."""
        version = yield self.thread(self.login, "u_trust", "anything")
        self.assertTrue(version.startswith("Odissey "), version)
        blocked = yield self.thread(self.login, "u_clear", "clear-pw")
        self.assertIn("pg_hba.conf rejects connection", blocked)
        wrong = yield self.thread(self.login, "u_clear", "wrong")
        self.assertIn("password authentication failed", wrong)


class FakeConsoleClient:
    """What the console reads of a client connection, and the error it was failed with."""

    def __init__(self, number: int, database: str = "db") -> None:
        self.id = f"c{number}"
        self.user = "u"
        self.database = database
        self.connected_at = 0.0
        self.relay = None
        self.console = None
        self.transport = None
        self.failed: list[PoolerError] = []

    def fail(self, error: PoolerError) -> None:
        self.failed.append(error)


class SessionHarness:
    """A ConsoleSession fed bytes directly, over pools with fake servers; what it wrote."""

    def session(self, role: str = ADMIN) -> ConsoleSession:
        config = parse({"listen": ["tcp:0"], "storages": {"pg": {"host": "127.0.0.1"}},
                        "routes": [{"database": "db", "user": "u", "storage": "pg"},
                                   {"database": "other", "user": "u", "storage": "pg"}],
                        "admin_users": ["u"]})
        clock = Clock()
        self.servers = FakeServers(clock)
        self.pools = Pools(clock, lambda *_: self.servers())  # type: ignore[arg-type]
        self.route = config.routes[0]
        self.clients: list[FakeConsoleClient] = []
        console = Console(config, Router(config.routes), self.pools,
                          lambda: self.clients, clock)  # type: ignore[arg-type,return-value]
        self.written: list[bytes] = []
        self.closed: list[PoolerError] = []
        self.dropped: list[bool] = []
        return ConsoleSession(console, role, self.written.append, self.closed.append,
                              lambda: self.dropped.append(True), "c1")

    def replies(self) -> list[tuple[str, bytes]]:
        data = b"".join(self.written)
        return [(chr(k), b or b"") for k, b, _ in Scanner(collect_all=True).feed(data)]

    def kinds(self) -> str:
        return "".join(kind for kind, _ in self.replies())

    def sqlstates(self) -> list[str]:
        return [m.parse_error_fields(body)["C"] for kind, body in self.replies() if kind == "E"]


class SessionTests(SessionHarness, SynchronousTestCase):
    """Message framing and the replies' shape."""

    def test_pipelined_and_split_queries(self) -> None:
        """Two queries in one chunk, and one cut anywhere, are each answered in order."""
        session = self.session()
        data = m.query("SHOW VERSION") + m.query("SHOW LISTS")
        session.data(data[:3])
        session.data(data[3:20])
        session.data(data[20:])
        kinds = "".join(kind for kind, _ in self.replies())
        self.assertEqual(kinds, "TDCZ" + "T" + "D" * 6 + "CZ")

    def test_several_commands_in_one_query(self) -> None:
        """Commands separated by ; run in turn; an error stops the rest, then one
        ReadyForQuery; an empty query gets EmptyQueryResponse."""
        session = self.session()
        session.data(m.query("SHOW VERSION; SHOW NOPE; SHOW VERSION"))
        session.data(m.query(" ; "))
        kinds = "".join(kind for kind, _ in self.replies())
        self.assertEqual(kinds, "TDCEZIZ")

    def test_extended_protocol_skipped_to_sync(self) -> None:
        """Parse/Bind/Execute get one 0A000 error; the Sync gets ReadyForQuery."""
        session = self.session()
        session.data(m.parse(b"", b"SHOW POOLS\0\0\0") + m.bind(b"", b"", b"\0\0\0\0\0\0")
                     + m.execute(b"") + m.sync())
        replies = self.replies()
        self.assertEqual("".join(kind for kind, _ in replies), "EZ")
        self.assertEqual(m.parse_error_fields(replies[0][1])["C"], "0A000")

    def test_stats_user(self) -> None:
        """A stats user may SHOW; any admin command is 42501."""
        session = self.session(STATS)
        session.data(m.query("show pools") + m.query("RESUME"))
        replies = self.replies()
        self.assertEqual("".join(kind for kind, _ in replies), "TCZEZ")
        self.assertEqual(m.parse_error_fields(replies[3][1])["C"], "42501")

    def test_bad_message_closes(self) -> None:
        """A message type the console does not speak closes it with 08P01; Terminate
        drops it quietly."""
        session = self.session()
        session.data(m.message(b"F", b"\0\0\0\0"))
        self.assertEqual([e.sqlstate for e in self.closed], ["08P01"])
        session = self.session()
        session.data(m.terminate())
        self.assertEqual(self.dropped, [True])

    def test_pause_answers_once_servers_are_released(self) -> None:
        """PAUSE db answers only when the database's busy server has been released (and
        closed); a command sent behind it waits its turn, then runs."""
        session = self.session()
        pool = self.pools.get(self.route, "db", "u")
        held = pool.wait("c9")
        server = self.servers.succeed_next()
        self.successResultOf(held)
        session.data(m.query("PAUSE db") + m.query("SHOW VERSION"))
        self.assertEqual(self.written, [])
        self.assertTrue(session.busy)
        pool.release(server)  # type: ignore[arg-type]
        self.assertEqual(self.kinds(), "CZTDCZ")
        self.assertEqual(self.replies()[0][1], b"PAUSE\0")
        self.assertFalse(session.busy)

class MergePoolsTests(SynchronousTestCase):
    def test_rows_of_workers_add_up(self) -> None:
        """SHOW POOLS rows of several workers: counts add up per (database, user, mode),
        the longest wait is kept, other pools stay apart."""
        rows = [
            ["db", "u", 1, 2, 3, 4, 0, 1, 0, 500, "transaction"],
            ["db", "u", 2, 0, 1, 0, 1, 0, 1, 10, "transaction"],
            ["db", "v", 5, 0, 0, 0, 0, 0, 0, 0, "session"],
        ]
        self.assertEqual(merge_pools(rows), [
            ["db", "u", 3, 2, 4, 4, 1, 1, 1, 10, "transaction"],
            ["db", "v", 5, 0, 0, 0, 0, 0, 0, 0, "session"],
        ])
