"""Bytes through the relay: COPY both ways, big results, extended protocol, NOTIFY, pgbench."""

from __future__ import annotations

import subprocess
import time

import psycopg
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest

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
        """pgbench (8 clients, extended protocol) runs through Odissey with no failures."""
        if not have("pgbench"):
            raise SkipTest("pgbench not installed")

        def bench() -> subprocess.CompletedProcess[str]:
            base = ["-h", "127.0.0.1", "-p", str(self.odissey.port), "-U", "app"]
            return subprocess.run(
                ["pgbench", "-n", "-c", "8", "-j", "2", "-t", "200", "-M", "extended", *base, "app"],
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
