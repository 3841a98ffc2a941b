"""Session pooling end to end: limits, waiting, reuse and reset, vanished clients, cancel,
the backend identity a session client sees."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import psycopg
from twisted.internet.defer import gatherResults, inlineCallbacks

from odissey.pool import PoolKey
from odissey.wire import messages as m
from tests.harness import (
    IntegrationTest, Replies, committed, direct, login_outcome, route, server_pids, trust_login, until,
)


class PoolLimitTests(IntegrationTest):
    """Pool size is enforced; waiters queue FIFO and time out with 53300."""

    def routes(self) -> list[dict]:
        return [route(pool={"size": 1, "wait_timeout": "1s"}),
                route("app", "u_trust", auth={"method": "trust"}, pool={"size": 1, "wait_timeout": "1s"})]

    @inlineCallbacks
    def test_wait_timeout(self):
        """With the only server taken, a second client gets 53300 naming the pool, at
        login (a session takes its server then)."""
        holder = yield self.thread(self.odissey.connect, user="u_trust", password=None)
        try:
            state, message = yield self.thread(login_outcome, self.odissey.port)
            self.assertEqual(state, "53300")
            self.assertIn('pool "app/u_trust"', message)
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


#: A client in a process of its own: libpq's PQcancel (psycopg's ``conn.cancel()``)
#: blocks holding the GIL, which would freeze the in-process Odissey that must answer it.
CANCEL_CLIENT = """
import json, sys, threading, time
import psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
method = getattr(conn, sys.argv[2])
driver_pid = conn.info.backend_pid
threading.Timer(0.5, method).start()
started = time.monotonic()
try:
    conn.execute("select pg_sleep(30)")
    state = "finished"
except psycopg.errors.QueryCanceled as exc:
    state = exc.sqlstate
elapsed = time.monotonic() - started
backend_pid = conn.execute("select pg_backend_pid()").fetchone()[0]
print(json.dumps([driver_pid, backend_pid, state, elapsed]))
"""


class SessionIdentityTests(IntegrationTest):
    """A session client is pinned to one backend and is told its real pid: the driver,
    pg_backend_pid(), NOTIFY and pg_terminate_backend agree; cancels still reach it."""

    @inlineCallbacks
    def test_driver_pid_is_the_backend_pid(self):
        """psycopg's conn.info.backend_pid is what pg_backend_pid() says, and PostgreSQL
        knows that backend as this user's."""
        def pids() -> tuple[int, int, object]:
            with self.odissey.connect() as conn:
                real = conn.execute("select pg_backend_pid()").fetchone()[0]
                with direct() as su:
                    user = su.execute("select usename from pg_stat_activity where pid = %s", (real,)).fetchone()
                return conn.info.backend_pid, real, user

        told, real, user = yield self.thread(pids)
        self.assertEqual(told, real)
        self.assertEqual(user, ("app",))

    @inlineCallbacks
    def test_terminating_own_backend(self):
        """pg_terminate_backend(pg_backend_pid()) ends that session with PostgreSQL's own
        57P01, the backend the driver named is the one gone, and a session opened before
        it and one opened after it are served."""
        other = yield self.thread(self.odissey.connect)
        try:
            def terminate() -> tuple[str, str, bool, bool, bool]:
                conn = self.odissey.connect()
                pid = conn.info.backend_pid
                was_there = pid in server_pids()
                state, message = "survived", ""
                try:
                    conn.execute("select pg_terminate_backend(pg_backend_pid())")
                except psycopg.errors.AdminShutdown as exc:
                    state, message = exc.sqlstate or "", str(exc)
                finally:
                    conn.close()
                deadline = time.monotonic() + 10
                while pid in server_pids() and time.monotonic() < deadline:
                    time.sleep(0.02)
                return state, message, conn.closed, was_there, pid not in server_pids()

            state, message, closed, was_there, gone = yield self.thread(terminate)
            self.assertEqual(state, "57P01")
            self.assertIn("terminating connection due to administrator command", message)
            self.assertTrue(closed)
            self.assertEqual((was_there, gone), (True, True))
            self.assertEqual((yield self.thread(lambda: other.execute("select 1").fetchone())), (1,))
            self.assertEqual((yield self.thread(self.query_outcome)), "served")
        finally:
            yield self.thread(other.close)

    @inlineCallbacks
    def test_notify_sender_pid(self):
        """A LISTENing session sees the notifier's driver-reported pid as the sender's."""
        def run() -> tuple[int, int, str]:
            with self.odissey.connect() as listener, self.odissey.connect() as sender:
                listener.execute("listen identity_channel")
                sender.execute("notify identity_channel, 'hi'")
                for note in listener.notifies(timeout=10, stop_after=1):
                    return note.pid, sender.info.backend_pid, note.payload
            raise AssertionError("no notification")

        sent_by, sender, payload = yield self.thread(run)
        self.assertEqual(payload, "hi")
        self.assertEqual(sent_by, sender)

    @inlineCallbacks
    def test_other_session_cancels_by_reported_pid(self):
        """pg_cancel_backend with the pid a session's driver reports cancels that session's query."""
        target = yield self.thread(self.odissey.connect)
        try:
            def sleep() -> str:
                try:
                    target.execute("select pg_sleep(10)")
                except psycopg.errors.QueryCanceled as exc:
                    return exc.sqlstate or ""
                return "finished"

            running = self.thread(sleep)

            def cancel_by_pid() -> bool:
                deadline = time.monotonic() + 10
                with direct() as su:
                    while not su.execute("select 1 from pg_stat_activity where pid = %s and query like %s",
                                         (target.info.backend_pid, "select pg_sleep%")).fetchone():
                        if time.monotonic() > deadline:
                            raise AssertionError("no backend with the reported pid runs the sleep")
                        time.sleep(0.02)
                with self.odissey.connect() as other:
                    return other.execute("select pg_cancel_backend(%s)", (target.info.backend_pid,)).fetchone()[0]

            self.assertTrue((yield self.thread(cancel_by_pid)))
            self.assertEqual((yield running), "57014")
        finally:
            yield self.thread(target.close)

    def cancel_in_another_process(self, method: str) -> list:
        done = subprocess.run([sys.executable, "-c", CANCEL_CLIENT, self.odissey.dsn(), method],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    @inlineCallbacks
    def test_cancel_with_the_real_pid(self):
        """psycopg's cancel() (libpq's PQcancel) and cancel_safe() send the key with the
        real pid and Odissey's secret: pg_sleep(30) ends with 57014 within seconds."""
        for method in ("cancel", "cancel_safe"):
            driver_pid, backend_pid, state, elapsed = yield self.thread(self.cancel_in_another_process, method)
            self.assertEqual(driver_pid, backend_pid, method)
            self.assertEqual(state, "57014", method)
            self.assertLess(elapsed, 10, method)
