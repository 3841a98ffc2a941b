"""Stopping without losing a transaction: graceful, wait-for-clients and immediate stops
of an in-process Odissey, driven through psycopg against the real PostgreSQL."""

from __future__ import annotations

import socket
from typing import Any

import psycopg
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from odissey.drain import QUIET
from odissey.lifecycle import Stop
from odissey.service import Phase
from tests.harness import APP_PASSWORD, IntegrationTest, committed, route, until


def refused(port: int) -> bool:
    """Nobody listens on the port any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def outcome(conn: psycopg.Connection, sql: str) -> str:
    """"ok", or the SQLSTATE the statement failed with."""
    try:
        conn.execute(sql)
    except psycopg.Error as exc:
        return exc.sqlstate or type(exc).__name__
    return "ok"


class GracefulTests(IntegrationTest):
    top: dict[str, Any] | None = {"shutdown_timeout": "20s"}

    def routes(self) -> list[dict[str, Any]]:
        return [route(pool={"mode": "transaction"}),
                route(user="u_trust", auth={"method": "trust"}, pool={"mode": "session"})]

    @inlineCallbacks
    def test_transaction_finishes_then_57P01(self):
        """A graceful stop closes the listener, lets an open transaction commit, and ends
        the client with 57P01 at its next statement. A client between transactions gets
        one more (then 57P01); one that stays quiet is ended after QUIET."""
        busy = yield self.thread(self.odissey.connect)
        idle = yield self.thread(self.odissey.connect)
        quiet = yield self.thread(self.odissey.connect)
        yield self.thread(busy.execute, "begin")
        yield self.thread(busy.execute, "insert into items values (7101, 'drain-commit')")
        yield self.thread(idle.execute, "select 1")
        service = self.odissey.service
        factory = service.factory
        service.shutdown(Stop.GRACEFUL)
        yield until(lambda: service.phase is Phase.DRAINING and not service.ports, 5, "listener closed")
        self.assertTrue((yield self.thread(refused, self.odissey.port)))
        self.assertEqual((yield self.thread(outcome, idle, "select 1")), "ok")
        self.assertEqual((yield self.thread(outcome, idle, "select 1")), "57P01")
        started = reactor.seconds()
        yield until(lambda: len(factory.clients) == 1, 5, "the quiet client ended")
        self.assertGreater(reactor.seconds() - started, QUIET / 2)
        self.assertIn((yield self.thread(outcome, quiet, "select 1")), ("57P01", "OperationalError"))
        self.assertEqual((yield self.thread(outcome, busy, "select pg_sleep(0.3)")), "ok")
        self.assertEqual((yield self.thread(outcome, busy, "commit")), "ok")
        self.assertTrue(committed("drain-commit"))
        self.assertEqual((yield self.thread(outcome, busy, "select 1")), "57P01")
        yield service.stopService()
        self.assertIs(service.phase, Phase.STOPPED)
        for conn in (busy, idle, quiet):
            conn.close()

    @inlineCallbacks
    def test_session_kept_until_timeout(self):
        """A session-mode client keeps its session through a graceful stop until it
        leaves; the stop completes when it does."""
        session = yield self.thread(self.odissey.connect, user="u_trust", password=None)
        yield self.thread(session.execute, "set application_name = 'kept'")
        service = self.odissey.service
        service.shutdown(Stop.GRACEFUL)
        yield until(lambda: not service.ports, 5, "listener closed")
        stopped = service.stopService()
        for _ in range(3):
            row = yield self.thread(lambda: session.execute("show application_name").fetchone())
            self.assertEqual(row[0], "kept")
        self.assertNoResult(stopped)
        yield self.thread(session.close)
        yield stopped

    @inlineCallbacks
    def test_second_request_hurries(self):
        """An immediate stop during a graceful one ends the waiting session at once."""
        session = yield self.thread(self.odissey.connect, user="u_trust", password=None)
        service = self.odissey.service
        service.shutdown(Stop.GRACEFUL)
        yield until(lambda: not service.ports, 5, "listener closed")
        service.shutdown(Stop.IMMEDIATE)
        yield service.stopService()
        self.assertEqual((yield self.thread(outcome, session, "select 1")), "57P01")
        session.close()


class ShortTimeoutTests(IntegrationTest):
    top: dict[str, Any] | None = {"shutdown_timeout": "0.5s"}

    def routes(self) -> list[dict[str, Any]]:
        return [route(pool={"mode": "transaction"})]

    @inlineCallbacks
    def test_timeout_ends_open_transaction(self):
        """Past shutdown_timeout a client still inside its transaction gets 57P01 and
        its transaction is rolled back."""
        conn = yield self.thread(self.odissey.connect)
        yield self.thread(conn.execute, "begin")
        yield self.thread(conn.execute, "insert into items values (7102, 'drain-timeout')")
        started = reactor.seconds()
        yield self.odissey.service.stopService()
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        self.assertEqual((yield self.thread(outcome, conn, "commit")), "57P01")
        self.assertFalse(committed("drain-timeout"))
        conn.close()


class WaitForClientsTests(IntegrationTest):
    top: dict[str, Any] | None = {"shutdown_timeout": "0.2s"}

    def routes(self) -> list[dict[str, Any]]:
        return [route(pool={"mode": "transaction"})]

    @inlineCallbacks
    def test_waits_for_the_last_client(self):
        """SHUTDOWN WAIT_FOR_CLIENTS ends nobody, whatever shutdown_timeout says: the
        stop completes when the last client leaves."""
        conn = yield self.thread(self.odissey.connect)
        service = self.odissey.service
        service.shutdown(Stop.WAIT_FOR_CLIENTS)
        yield until(lambda: not service.ports, 5, "listener closed")
        stopped = service.stopService()
        for _ in range(3):
            self.assertEqual((yield self.thread(outcome, conn, "select pg_sleep(0.2)")), "ok")
        self.assertNoResult(stopped)
        yield self.thread(conn.close)
        yield stopped


class ConsoleShutdownTests(IntegrationTest):
    top: dict[str, Any] | None = {"admin_users": ["app"], "stats_users": ["u_trust"]}

    def routes(self) -> list[dict[str, Any]]:
        return [route(pool={"mode": "transaction"}),
                route(user="u_trust", auth={"method": "trust"})]

    def console(self, user: str = "app") -> psycopg.Connection:
        password = None if user == "u_trust" else APP_PASSWORD
        return psycopg.connect(self.odissey.dsn(user=user, password=password, dbname="pgbouncer"),
                               autocommit=True, cursor_factory=psycopg.ClientCursor,
                               connect_timeout=10)

    @inlineCallbacks
    def test_shutdown_is_immediate(self):
        """Console SHUTDOWN is answered, then every client is ended with 57P01 (one
        inside a transaction too, which rolls back) and the service stops."""
        client = yield self.thread(self.odissey.connect)
        yield self.thread(client.execute, "begin")
        yield self.thread(client.execute, "insert into items values (7103, 'console-shutdown')")
        console = yield self.thread(self.console)
        cur = yield self.thread(console.execute, "SHUTDOWN")
        self.assertEqual(cur.statusmessage, "SHUTDOWN")
        service = self.odissey.service
        yield until(lambda: service.phase is Phase.STOPPED, 10, "stopped")
        self.assertEqual((yield self.thread(outcome, client, "commit")), "57P01")
        self.assertFalse(committed("console-shutdown"))
        client.close()
        console.close()

    @inlineCallbacks
    def test_shutdown_wait_for_clients(self):
        """SHUTDOWN WAIT_FOR_CLIENTS closes the listener, lets the client go on working
        (the console session too), and stops once the client has left."""
        client = yield self.thread(self.odissey.connect)
        console = yield self.thread(self.console)
        try:
            yield self.thread(console.execute, "SHUTDOWN WAIT_FOR_CLIENTS")
            service = self.odissey.service
            yield until(lambda: not service.ports and service.phase is Phase.DRAINING, 5, "draining")
            self.assertTrue((yield self.thread(refused, self.odissey.port)))
            for _ in range(3):
                self.assertEqual((yield self.thread(outcome, client, "select 1")), "ok")
            rows = yield self.thread(lambda: console.execute("SHOW CLIENTS").fetchall())
            self.assertEqual(len(rows), 2)  # the client and the console session
            self.assertIs(service.phase, Phase.DRAINING)
        finally:  # (else a failure would leave the stop, and tearDown, waiting)
            yield self.thread(client.close)
        yield until(lambda: service.phase is Phase.STOPPED, 10, "stopped")
        console.close()

    @inlineCallbacks
    def test_stats_user_may_not_shut_down(self):
        """A stats user's SHUTDOWN gets 42501 and nothing stops."""
        console = yield self.thread(self.console, "u_trust")
        self.assertEqual((yield self.thread(outcome, console, "SHUTDOWN")), "42501")
        self.assertIs(self.odissey.service.phase, Phase.RUNNING)
        console.close()
