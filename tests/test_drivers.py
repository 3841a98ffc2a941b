"""Drivers other than libpq, through Odissey in both pool modes: asyncpg (its own protocol
code, named prepared statements, binary COPY, asynchronous cancel) and PostgreSQL's JDBC
driver (server-side prepared statements past its prepareThreshold, batches)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any, Awaitable, Callable

import asyncpg
from twisted.internet.defer import Deferred, inlineCallbacks

from twisted.internet.defer import gatherResults
from twisted.trial.unittest import SkipTest

from tests.harness import APP_PASSWORD, IntegrationTest, direct, have, route, server_pids

#: Debian's libpostgresql-jdbc-java (installed by .ci/install when Java is there).
JDBC_JAR = Path("/usr/share/java/postgresql.jar")
JDBC_PROBE = Path(__file__).parent / "jdbc" / "Probe.java"


class DriverTest(IntegrationTest):
    """Database ``app`` in session mode; ``app_tx``, the same server database, in
    transaction mode with two servers."""

    def routes(self) -> list[dict[str, Any]]:
        return [
            route("app", "app"),
            route("app_tx", "app", server={"database": "app"}, pool={"mode": "transaction", "size": 2}),
        ]


class AsyncpgTests(DriverTest):

    def run_async(self, main: Callable[[], Awaitable[Any]]) -> "Deferred[Any]":
        """Run an asyncio coroutine function on its own event loop in a client thread."""
        return self.thread(lambda: asyncio.run(main()))

    async def connect(self, database: str = "app", **options: Any) -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=self.odissey.port, user="app",
                                     password=APP_PASSWORD, database=database, ssl=False, **options)

    @inlineCallbacks
    def test_session_mode(self):
        """Prepared statements, binary COPY, a rolled-back transaction and an error, on one session."""
        async def main() -> dict[str, Any]:
            conn = await self.connect()
            try:
                seen: dict[str, Any] = {"version": conn.get_server_version().major}
                statement = await conn.prepare("select $1::int * 2")
                seen["prepared"] = [await statement.fetchval(i) for i in range(3)]
                await conn.execute("create temp table drv (x int, note text)")
                await conn.copy_records_to_table("drv", records=[(i, f"n{i}") for i in range(1000)])
                seen["copied"] = await conn.fetchval("select sum(x) from drv")
                try:
                    async with conn.transaction():
                        await conn.execute("insert into drv values (-1, 'rolled back')")
                        await conn.execute("select 1/0")
                except asyncpg.DivisionByZeroError as exc:
                    seen["error"] = exc.sqlstate
                seen["after"] = await conn.fetchval("select count(*) from drv where x = -1")
                return seen
            finally:
                await conn.close()

        seen = yield self.run_async(main)
        self.assertGreaterEqual(seen["version"], 12)
        self.assertEqual(seen["prepared"], [0, 2, 4])
        self.assertEqual(seen["copied"], sum(range(1000)))
        self.assertEqual((seen["error"], seen["after"]), ("22012", 0))

    @inlineCallbacks
    def test_transaction_mode_shares_two_servers(self):
        """Twenty asyncpg clients (statement cache off) on a pool of two: every answer is
        the asking client's own, inside transactions too, and PostgreSQL sees two backends."""
        async def main() -> list[tuple[int, str]]:
            conns = [await self.connect("app_tx", statement_cache_size=0) for _ in range(20)]
            try:
                async def work(i: int, conn: asyncpg.Connection) -> tuple[int, str]:
                    async with conn.transaction():
                        await conn.execute(f"set local application_name = 'drv{i}'")
                        await asyncio.sleep(0.01)
                        doubled = await conn.fetchval("select $1::int * 2", i)
                        name = await conn.fetchval("select current_setting('application_name')")
                    return doubled, name

                return list(await asyncio.gather(*(work(i, c) for i, c in enumerate(conns))))
            finally:
                for conn in conns:
                    await conn.close()

        results = yield self.run_async(main)
        self.assertEqual(results, [(2 * i, f"drv{i}") for i in range(20)])
        self.assertLessEqual(len((yield self.thread(server_pids))), 2)

    @inlineCallbacks
    def test_timeout_cancels_through_odissey(self):
        """asyncpg's timeout sends a CancelRequest with Odissey's key: the query stops and
        the connection goes on, in both modes."""
        async def main(database: str) -> tuple[str, int]:
            conn = await self.connect(database, statement_cache_size=0)
            try:
                try:
                    await conn.fetchval("select pg_sleep(20)", timeout=0.5)
                    outcome = "finished"
                except asyncio.TimeoutError:
                    outcome = "timed out"
                return outcome, await conn.fetchval("select 7")
            finally:
                await conn.close()

        def sleeping() -> int:
            with direct() as conn:
                return int(conn.execute("select count(*) from pg_stat_activity"
                                        " where query like 'select pg_sleep(20)%' and state = 'active'").fetchone()[0])

        for database in ("app", "app_tx"):
            outcome = yield self.run_async(lambda: main(database))
            self.assertEqual(outcome, ("timed out", 7), database)
            self.assertEqual((yield self.thread(sleeping)), 0, database)


class JdbcTests(DriverTest):
    def setUp(self) -> "Deferred[None]":
        if not (have("java") and JDBC_JAR.exists()):
            raise SkipTest("needs java and Debian's libpostgresql-jdbc-java")
        return super().setUp()

    def probe(self, database: str, prepare_threshold: int) -> dict[str, str]:
        """Run tests/jdbc/Probe.java (Java's single-file mode) and parse its key=value lines."""
        url = f"jdbc:postgresql://127.0.0.1:{self.odissey.port}/{database}"
        done = subprocess.run(
            ["java", "-cp", str(JDBC_JAR), str(JDBC_PROBE), url, "app", APP_PASSWORD, str(prepare_threshold)],
            capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    expected = {"prepared_sum": "90", "batch": "100", "batch_sum": "5050", "error": "22012", "after": "still here"}

    @inlineCallbacks
    def test_session_mode_server_prepared_statements(self):
        """Session mode with the driver's default threshold: its named statements live on the session's server."""
        seen = yield self.thread(self.probe, "app", 5)
        self.assertEqual(seen.pop("server_statements"), "1")
        self.assertEqual(seen, self.expected)

    @inlineCallbacks
    def test_transaction_mode_eight_sessions_share_two_servers(self):
        """Eight JDBC sessions at once, with the driver's default prepareThreshold (5):
        its named server statements (S_1, ...) work whichever of the two servers a
        transaction lands on."""
        seen = yield gatherResults([self.thread(self.probe, "app_tx", 5) for _ in range(8)])
        for one in seen:
            one.pop("server_statements")  # Odissey's shared statements, on whichever server
        self.assertEqual(seen, [self.expected] * 8)
