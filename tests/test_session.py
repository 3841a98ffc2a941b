"""Session pooling end to end: limits, waiting, reuse and reset, vanished clients, cancel."""

from __future__ import annotations

import socket
import threading
import time

import psycopg
from twisted.internet.defer import gatherResults, inlineCallbacks

from odissey.pool import PoolKey
from odissey.wire import messages as m
from tests.harness import IntegrationTest, Replies, committed, route, trust_login, until


class PoolLimitTests(IntegrationTest):
    """Pool size is enforced; waiters queue FIFO and time out with 53300."""

    def routes(self) -> list[dict]:
        return [route(pool={"size": 1, "wait_timeout": "1s"})]

    @inlineCallbacks
    def test_wait_timeout(self):
        """With the only server taken, a second client gets 53300 naming the pool."""
        holder = yield self.thread(self.odissey.connect)
        try:
            yield self.thread(lambda: holder.execute("select 1").close())
            outcome = yield self.thread(self.query_outcome)
            self.assertTrue(outcome.startswith("53300"), outcome)
            self.assertIn('pool "app/app"', outcome)
        finally:
            yield self.thread(holder.close)

    @inlineCallbacks
    def test_waiter_served_when_server_freed(self):
        """A waiting client gets the server as soon as its holder leaves, on the same backend."""
        holder = yield self.thread(self.odissey.connect)
        pid = yield self.thread(lambda: holder.execute("select pg_backend_pid()").fetchone()[0])

        def waiter() -> int:
            with self.odissey.connect() as conn:
                return conn.execute("select pg_backend_pid()").fetchone()[0]

        waiting = self.thread(waiter)
        pool = self.odissey.service.pools.pools[PoolKey("app", "app")]
        yield until(lambda: pool.waiters, 5, "the second client waits")
        yield self.thread(holder.close)
        self.assertEqual((yield waiting), pid)

    @inlineCallbacks
    def test_pool_size_enforced(self):
        """Eight sequential-but-overlapping clients never open more than one server."""
        def client(i: int) -> int:
            with self.odissey.connect() as conn:
                return conn.execute("select pg_backend_pid()").fetchone()[0]

        pids = yield gatherResults([self.thread(client, i) for i in range(8)])
        self.assertEqual(len(set(pids)), 1)


class ResetTests(IntegrationTest):
    """A server is cleaned between session clients and reused."""

    def routes(self) -> list[dict]:
        return [route(pool={"size": 1})]

    @inlineCallbacks
    def test_session_state_reset(self):
        """The next client on the same backend sees none of the previous one's SETs or temp tables."""
        def first() -> int:
            with self.odissey.connect() as conn:
                conn.execute("set work_mem = '7MB'")
                conn.execute("create temp table scratch (x int)")
                return conn.execute("select pg_backend_pid()").fetchone()[0]

        def second() -> tuple[int, str, int]:
            with self.odissey.connect() as conn:
                pid = conn.execute("select pg_backend_pid()").fetchone()[0]
                mem = conn.execute("show work_mem").fetchone()[0]
                temp = conn.execute(
                    "select count(*) from pg_class where relname = 'scratch' and relpersistence = 't'"
                ).fetchone()[0]
                return pid, mem, temp

        pid = yield self.thread(first)
        pid2, mem, temp = yield self.thread(second)
        self.assertEqual(pid, pid2)
        self.assertNotEqual(mem, "7MB")
        self.assertEqual(temp, 0)

    @inlineCallbacks
    def test_client_killed_mid_transaction(self):
        """A client that vanishes inside a transaction: its row is not committed, the server is reused."""
        pid = yield self.thread(self.vanish_inside_transaction, 7001, "vanished-session")
        self.assertEqual((yield self.thread(self.backend_pid)), pid)
        self.assertFalse((yield self.thread(committed, "vanished-session")))

    @inlineCallbacks
    def test_client_killed_mid_query(self):
        """A client that vanishes while its query runs: the query is cancelled at once, the server reused."""
        pid = yield self.thread(self.vanish_during, b"select pg_sleep(30)")
        started = time.monotonic()
        self.assertEqual((yield self.thread(self.backend_pid)), pid)
        self.assertLess(time.monotonic() - started, 5)


class CancelTests(IntegrationTest):
    """CancelRequest with Odissey's key reaches the right server."""

    @inlineCallbacks
    def test_cancel_pg_sleep(self):
        """Cancelling pg_sleep(30) ends it with 57014 within seconds; the session goes on."""
        conn = yield self.thread(self.odissey.connect)
        try:
            def cancel_soon() -> None:
                time.sleep(0.5)
                conn.cancel_safe()  # cancel() is libpq's PQcancel: it blocks holding the GIL

            def sleeper() -> tuple[str, float]:
                started = time.monotonic()
                threading.Thread(target=cancel_soon).start()
                try:
                    conn.execute("select pg_sleep(30)")
                except psycopg.errors.QueryCanceled as exc:
                    return exc.sqlstate or "", time.monotonic() - started
                return "finished", time.monotonic() - started

            state, elapsed = yield self.thread(sleeper)
            self.assertEqual(state, "57014")
            self.assertLess(elapsed, 5)
            self.assertEqual((yield self.thread(lambda: conn.execute("select 1").fetchone())), (1,))
        finally:
            yield self.thread(conn.close)

    @inlineCallbacks
    def test_unknown_key_ignored(self):
        """A cancel with a key Odissey never issued does nothing."""
        conn = yield self.thread(self.odissey.connect)
        try:
            def bogus_cancel_then_query() -> int:
                with socket.create_connection(("127.0.0.1", self.odissey.port)) as sock:
                    from odissey.wire import messages as m

                    sock.sendall(m.cancel_request(12345, 678))
                    sock.recv(1)
                return conn.execute("select 5").fetchone()[0]

            self.assertEqual((yield self.thread(bogus_cancel_then_query)), 5)
        finally:
            yield self.thread(conn.close)


class ProtocolViolationTests(IntegrationTest):
    """A forbidden message from an attached client: none of its chunk reaches the server."""

    def routes(self):  # type: ignore[no-untyped-def]
        return [route("app", "u_trust", auth={"method": "trust"}, pool={"size": 1, "reset_query": ""})]

    @inlineCallbacks
    def test_good_messages_before_the_bad_one_never_run(self):
        """BEGIN and INSERT arrive in one chunk with a message of impossible length: the
        client gets 08P01; neither statement runs, so no open transaction can reach the
        next client on that server (who would commit it), and the server is replaced."""
        def violate() -> tuple[int, bytes]:
            sock = trust_login(self.odissey.port)
            try:
                replies = Replies(sock)
                sock.sendall(m.query("select pg_backend_pid()"))
                replies.until(1)
                sock.sendall(m.query("begin") + m.query("insert into items values (62100, 'violation')")
                             + b"Q\xff\xff\xff\xffgarbage")
                answer = replies.buffer
                while chunk := sock.recv(65536):
                    answer += chunk
                return int(replies.rows[0]), answer
            finally:
                sock.close()

        pid, answer = yield self.thread(violate)
        self.assertIn(b"C08P01\0", answer)

        def next_client() -> tuple[int, object]:
            with self.odissey.connect(user="u_trust", password=None) as conn:
                backend = int(conn.execute("select pg_backend_pid()").fetchone()[0])
                status = conn.info.transaction_status
                conn.execute("commit")
                return backend, status

        backend, status = yield self.thread(next_client)
        self.assertEqual(status, psycopg.pq.TransactionStatus.IDLE)
        self.assertNotEqual(backend, pid)
        self.assertFalse((yield self.thread(committed, "violation")))
